package apply

import (
	"context"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestWatchersNetns proves that each kind of change reaches the trigger
// channel: our address removed, our link changed, an nftables commit.
func TestWatchersNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft")
	ns := netnstest.New(t)
	ns.Run(t, "ip", "addr", "add", "10.96.0.2/32", "dev", "lo")
	h := ns.NetNS(t)
	w := Watchers{Namespace: &h, Interface: "lo", Addrs: []netip.Addr{netip.MustParseAddr("10.96.0.2")}, NFTables: true}
	ctx, cancel := context.WithCancel(context.Background())
	out := make(chan Trigger, 1)
	done := make(chan struct{})
	go func() { w.Run(ctx, out); close(done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("watchers did not stop after cancel")
		}
	})

	// Each action is repeated until its trigger arrives: a subscription may
	// not be in place yet, and a trigger waiting in out stands for later
	// ones of any kind.
	seen := map[Trigger]bool{}
	waitFor := func(want Trigger, action func()) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			action()
			select {
			case tr := <-out:
				seen[tr] = true
				if tr == want {
					return
				}
			case <-deadline:
				t.Fatalf("no %s trigger within 10s (seen %v)", want, seen)
			case <-time.After(50 * time.Millisecond): // poll: repeat the action
			}
		}
	}
	n := 0
	waitFor(TriggerAddress, func() {
		n++
		if n%2 == 1 {
			ns.Run(t, "ip", "addr", "del", "10.96.0.2/32", "dev", "lo")
		} else {
			ns.Run(t, "ip", "addr", "add", "10.96.0.2/32", "dev", "lo")
		}
	})
	// Setting the same MTU again is no change and no event: alternate.
	mtu := 65000
	waitFor(TriggerLink, func() {
		mtu = 130001 - mtu
		ns.Run(t, "ip", "link", "set", "lo", "mtu", strconv.Itoa(mtu))
	})
	waitFor(TriggerNFTables, func() { ns.Run(t, "iptables-nft", "-A", "INPUT", "-j", "ACCEPT") })
}
