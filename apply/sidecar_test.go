package apply

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestSidecarSyncRunsEveryPartAndJoinsErrors(t *testing.T) {
	nl := newFake(t, nil)
	nl.fail = map[string]error{"AddrAdd lo": errors.New("permission denied")}
	address := NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")})
	rs := ruleset(t, "10.96.0.2")
	node := newFakeNode(t).converged(BackendNFT, rs)
	rules, stats := node.rules(BackendNFT, rs)
	s := NewSidecar(address, []*Rules{rules}, stats)

	err := s.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "address") || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("Sync error %v, want the address failure", err)
	}
	if node.nfnlReads == 0 {
		t.Error("the rules were not read after the address failed")
	}
	if stats.SyncsFailed.Load() != 1 || stats.SyncsSucceeded.Load() != 0 {
		t.Errorf("stats: %d failed, %d succeeded; want 1, 0", stats.SyncsFailed.Load(), stats.SyncsSucceeded.Load())
	}
}

// TestSidecarRunKeepsGoingAfterFailures: a failed sync is retried on its
// own, with neither an event nor the interval (an hour) to wake the loop.
func TestSidecarRunKeepsGoingAfterFailures(t *testing.T) {
	nl := newFake(t, nil)
	nl.fail = map[string]error{"AddrAdd lo": errors.New("permission denied")}
	stats := &Counts{}
	s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), nil, stats)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, time.Hour, nil)
		close(done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for stats.SyncsFailed.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d syncs after 10s", stats.SyncsFailed.Load())
		}
		time.Sleep(time.Millisecond) // polling interval, not synchronisation
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}

func TestSidecarCleanupTriesEverything(t *testing.T) {
	nl := newFake(t, nil, "lo 10.96.0.2/32")
	rs := ruleset(t, "10.96.0.2")
	node := newFakeNode(t)
	node.nfnlErr = errors.New("permission denied")
	rules, stats := node.rules(BackendNFT, rs)
	s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), []*Rules{rules}, stats)
	_, err := s.Cleanup(context.Background())
	if err == nil || !strings.Contains(err.Error(), "IPv4 rules") {
		t.Fatalf("Cleanup error %v, want the rules failure", err)
	}
	if len(nl.calls) != 1 || !strings.HasPrefix(nl.calls[0], "AddrDel lo 10.96.0.2/32") {
		t.Errorf("address calls %q, want the address removed despite the rules failure", nl.calls)
	}
}

func TestRunCoalescesEventBursts(t *testing.T) {
	nl := newFake(t, nil, "lo 10.96.0.2/32")
	stats := &Counts{}
	s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), nil, stats)
	events := make(chan Trigger)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, time.Hour, events)
		close(done)
	}()
	defer func() {
		cancel()
		<-done
	}()
	for range 1000 {
		events <- TriggerNFTables // unbuffered: each is received by the loop
	}
	deadline := time.Now().Add(10 * time.Second)
	for stats.Verifications.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d verifications, want the startup one and one for the burst", stats.Verifications.Load())
		}
		time.Sleep(time.Millisecond) // polling interval
	}
	// 1000 events sent as fast as the loop takes them last a few ms: at
	// most one verification per debounceMax of them, plus the startup one.
	if n := stats.Verifications.Load(); n > 3 {
		t.Errorf("%d verifications for one burst, want at most 3", n)
	}
}

// With kernel events, an interval sync leaves the address to the events:
// an address removed behind the sidecar's back, with no event, stays
// removed through interval syncs, and is back as soon as an event comes.
// Without events every interval sync checks it.
func TestRunChecksTheAddressOnEventsOrWithoutThem(t *testing.T) {
	for _, withEvents := range []bool{true, false} {
		nl := newFake(t, nil)
		address := NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")})
		stats := &Counts{}
		s := NewSidecar(address, nil, stats)
		var events chan Trigger
		if withEvents {
			events = make(chan Trigger, 1)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			s.Run(ctx, time.Millisecond, events)
			close(done)
		}()
		present := func() bool {
			address.mu.Lock()
			defer address.mu.Unlock()
			return len(nl.addrs[1]) == 1
		}
		waitFor := func(what string, cond func() bool) {
			t.Helper()
			deadline := time.Now().Add(10 * time.Second)
			for !cond() {
				if time.Now().After(deadline) {
					t.Fatalf("events %v: %s: not within 10s", withEvents, what)
				}
				time.Sleep(time.Millisecond) // polling interval, not synchronisation
			}
		}
		waitFor("address added at start", present)
		address.mu.Lock()
		delete(nl.addrs, 1) // gone, and no event says so
		address.mu.Unlock()
		syncs := stats.SyncsSucceeded.Load()
		waitFor("five more interval syncs", func() bool { return stats.SyncsSucceeded.Load() >= syncs+5 })
		if present() == withEvents {
			t.Errorf("events %v: after five interval syncs the address is present: %v", withEvents, present())
		}
		if withEvents {
			events <- TriggerAddress
			waitFor("address back after its event", present)
		}
		cancel()
		<-done
	}
}

// A verification on an event checks only what the event concerns, except
// after a failed sync: then everything, so that a sync reported as a
// success (and /readyz) never leaves out what failed.
func TestRunScopesVerificationsByEvent(t *testing.T) {
	nl := newFake(t, nil)
	nl.fail = map[string]error{"AddrAdd lo": errors.New("permission denied")}
	address := NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")})
	stats := &Counts{}
	s := NewSidecar(address, nil, stats)
	events := make(chan Trigger, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, time.Hour, events)
		close(done)
	}()
	defer func() { cancel(); <-done }()
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 10s", what)
			}
			time.Sleep(time.Millisecond) // polling interval, not synchronisation
		}
	}
	waitFor("the startup sync fails", func() bool { return stats.SyncsFailed.Load() == 1 })
	// An nftables event concerns only the rules, but the last sync failed
	// on the address: it is checked again, and fails again.
	events <- TriggerNFTables
	waitFor("the nftables event's sync fails too", func() bool { return stats.SyncsFailed.Load() == 2 })
	if stats.SyncsSucceeded.Load() != 0 {
		t.Fatal("a sync succeeded while the address could not be added")
	}
}

// fakeDNAT is a dnatChecker that reports one finding at its first check.
type fakeDNAT struct {
	mu     sync.Mutex
	checks int
}

func (f *fakeDNAT) Check(context.Context) ([]DNATFinding, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.checks++
	if f.checks > 1 {
		return nil, nil
	}
	return []DNATFinding{{Original: netip.MustParseAddrPort("100.64.0.1:443"), To: netip.MustParseAddrPort("10.96.0.2:443"), New: 3}}, nil
}

func (f *fakeDNAT) Unfiltered() error { return nil }

func (f *fakeDNAT) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.checks
}

// TestRunChecksDNATAtIntervalsOnly proves that the DNAT check runs at the
// interval syncs, never at start-up or on events, and that what it finds
// is reported to the Observer without touching readiness.
func TestRunChecksDNATAtIntervalsOnly(t *testing.T) {
	for _, interval := range []time.Duration{time.Hour, 5 * time.Millisecond} {
		nl := newFake(t, nil)
		stats := &Counts{}
		s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), nil, stats)
		check := &fakeDNAT{}
		s.CheckDNAT(check)
		events := make(chan Trigger)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			s.Run(ctx, interval, events)
			close(done)
		}()
		events <- TriggerAddress
		events <- TriggerLink
		deadline := time.Now().Add(10 * time.Second)
		want := int64(2) // start-up, and one for both events (debounced)
		if interval < time.Hour {
			want = 8
		}
		for stats.Verifications.Load() < want {
			if time.Now().After(deadline) {
				t.Fatalf("interval %s: %d verifications, want %d", interval, stats.Verifications.Load(), want)
			}
			time.Sleep(time.Millisecond) // polling interval
		}
		cancel()
		<-done
		switch {
		case interval == time.Hour && check.count() != 0:
			t.Errorf("with no interval sync the DNAT check ran %d times, want none", check.count())
		case interval < time.Hour && check.count() == 0:
			t.Errorf("interval syncs ran no DNAT check")
		case interval < time.Hour && stats.UntrackedDNATs.Load() != 3:
			t.Errorf("untracked DNATs reported: %d, want the 3 found once", stats.UntrackedDNATs.Load())
		}
		if stats.SyncsFailed.Load() != 0 {
			t.Errorf("a finding failed %d syncs", stats.SyncsFailed.Load())
		}
	}
}
