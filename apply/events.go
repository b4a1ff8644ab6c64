package apply

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Trigger says why a verification runs; it is the value of the
// verifications metric's "trigger" label.
type Trigger string

// The reasons a verification runs.
const (
	TriggerStartup  Trigger = "startup"
	TriggerInterval Trigger = "interval"
	TriggerAddress  Trigger = "address_event"
	TriggerLink     Trigger = "link_event"
	TriggerNFTables Trigger = "nftables_event"
	// TriggerLegacyChange: polling found a legacy table we use changed.
	TriggerLegacyChange Trigger = "legacy_change"
	// TriggerRetry: the sync before failed.
	TriggerRetry Trigger = "retry"
)

// Watchers tell the sync loop when the kernel changed something that may
// concern us, so that it verifies within milliseconds instead of at the
// next interval. Every (re)subscription is followed by a trigger, since
// events may have been missed while there was none.
type Watchers struct {
	// Namespace is the network namespace to watch; nil means the current
	// one.
	Namespace *netns.NsHandle
	Interface string
	Addrs     []netip.Addr
	// NFTables also watches nftables changes (the nft backend's rules).
	NFTables bool
	// Legacy also polls the legacy iptables tables that hold our rules
	// (raw and filter of each family of Addrs) for changes: the legacy
	// backend sends no events (see watchLegacy).
	Legacy bool
	// LegacySeen is shared with the Rules that keep the legacy tables
	// (Rules.SetLegacySeen), so that a poll compares with what their
	// last sync found; nil: the poller compares with its own last poll
	// alone, and may miss a repair undone before the next poll.
	LegacySeen *LegacySeen
}

// Backoff bounds for re-subscribing after a netlink error.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 30 * time.Second
)

// Run watches until ctx is done and sends triggers to out. A watcher never
// waits for out: triggers that arrive while the sync loop is busy are kept
// as a set, one of each kind, so that a burst of one kind costs one
// verification and none of another kind is lost (a verification checks
// only what its triggers concern).
func (w Watchers) Run(ctx context.Context, out chan<- Trigger) {
	var wg sync.WaitGroup
	send := forwardSet(ctx, &wg, out)
	wg.Go(func() { w.resubscribe(ctx, "address", TriggerAddress, send, w.watchAddrs) })
	wg.Go(func() { w.resubscribe(ctx, "link", TriggerLink, send, w.watchLinks) })
	if w.NFTables {
		wg.Go(func() { w.resubscribe(ctx, "nftables", TriggerNFTables, send, w.watchNFTables) })
	}
	if w.Legacy {
		wg.Go(func() { w.resubscribe(ctx, "legacy iptables", TriggerLegacyChange, send, w.watchLegacy) })
	}
	wg.Wait()
}

// forwardSet returns a send that never blocks: triggers are kept as a set,
// one of each kind, and a goroutine (in wg) hands them to out in a fixed
// order as fast as out takes them, until ctx is done.
func forwardSet(ctx context.Context, wg *sync.WaitGroup, out chan<- Trigger) func(Trigger) {
	var mu sync.Mutex
	pending := map[Trigger]bool{}
	wake := make(chan struct{}, 1)
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			mu.Lock()
			kinds := slices.Sorted(maps.Keys(pending))
			clear(pending)
			mu.Unlock()
			for _, t := range kinds {
				select {
				case out <- t:
				case <-ctx.Done():
					return
				}
			}
		}
	})
	return func(t Trigger) {
		mu.Lock()
		pending[t] = true
		mu.Unlock()
		select {
		case wake <- struct{}{}:
		default:
		}
	}
}

// resubscribe runs watch again after each failure, with exponential
// backoff, until ctx is done. watch returns when its subscription ended.
func (w Watchers) resubscribe(ctx context.Context, what string, t Trigger, send func(Trigger), watch func(context.Context, func(Trigger)) error) {
	backoff := minBackoff
	for ctx.Err() == nil {
		started := time.Now()
		err := watch(ctx, send)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > maxBackoff {
			backoff = minBackoff // it ran well for a while
		}
		klog.ErrorS(err, "Kernel event subscription ended; subscribing again", "events", what, "retryIn", backoff)
		send(t) // whatever happened meanwhile goes unseen: verify
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// watchAddrs sends TriggerAddress for every added or removed address equal
// to one of ours, on any link.
func (w Watchers) watchAddrs(ctx context.Context, send func(Trigger)) error {
	ours := map[netip.Addr]bool{}
	for _, a := range w.Addrs {
		ours[a] = true
	}
	return watchUpdates(ctx, "address", TriggerAddress, send,
		func(ch chan<- netlink.AddrUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: w.Namespace, ErrorCallback: onErr})
		},
		func(u netlink.AddrUpdate) bool {
			ip, ok := netip.AddrFromSlice(u.LinkAddress.IP)
			return ok && ours[ip.Unmap()]
		})
}

// watchLinks sends TriggerLink for every change to the link named
// Interface: created, deleted, set up or down.
func (w Watchers) watchLinks(ctx context.Context, send func(Trigger)) error {
	return watchUpdates(ctx, "link", TriggerLink, send,
		func(ch chan<- netlink.LinkUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: w.Namespace, ErrorCallback: onErr})
		},
		func(u netlink.LinkUpdate) bool { return u.Link != nil && u.Link.Attrs().Name == w.Interface })
}

// watchUpdates runs one rtnetlink subscription until ctx is done or it
// fails: subscribe starts it, feeding ch until done is closed and reporting
// errors to onErr. It sends t once subscribed, then for every update that
// matters.
func watchUpdates[U any](ctx context.Context, what string, t Trigger, send func(Trigger),
	subscribe func(ch chan<- U, done <-chan struct{}, onErr func(error)) error, matters func(U) bool) error {
	ch := make(chan U, 64)
	done := make(chan struct{})
	defer close(done)
	errc := make(chan error, 1)
	onErr := func(err error) {
		select {
		case errc <- err:
		default:
		}
	}
	if err := subscribe(ch, done, onErr); err != nil {
		return fmt.Errorf("subscribing to %s updates: %w", what, err)
	}
	send(t)
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case u, ok := <-ch:
			if !ok {
				return fmt.Errorf("%s updates closed", what)
			}
			if matters(u) {
				send(t)
			}
		}
	}
}

// watchNFTables sends TriggerNFTables for every nftables change: each
// committed transaction ends with a new-generation message on the
// NFNLGRP_NFTABLES group. iptables-nft writes through nftables, so this
// covers the nft backend's rules; the legacy backend has no such events.
func (w Watchers) watchNFTables(ctx context.Context, send func(Trigger)) error {
	ns := netns.None()
	if w.Namespace != nil {
		ns = *w.Namespace
	}
	s, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_NETFILTER, unix.NFNLGRP_NFTABLES)
	if err != nil {
		return fmt.Errorf("subscribing to nftables changes: %w", err)
	}
	stop := context.AfterFunc(ctx, s.Close)
	defer func() {
		if stop() {
			s.Close()
		}
	}()
	send(TriggerNFTables)
	for {
		msgs, _, err := s.Receive()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, unix.ENOBUFS) {
			// The kernel dropped messages: something changed, verify.
			send(TriggerNFTables)
			continue
		}
		if err != nil {
			return fmt.Errorf("receiving nftables changes: %w", err)
		}
		if len(msgs) > 0 {
			send(TriggerNFTables)
		}
	}
}
