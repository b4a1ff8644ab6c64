package apply

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestSidecarSyncRunsEveryPartAndJoinsErrors(t *testing.T) {
	nl := newFake(t, nil)
	nl.fail = map[string]error{"AddrAdd lo": errors.New("permission denied")}
	address := NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")})
	rules, stats := newRules(t, BackendNFT, ruleset(t, "10.96.0.2"), nil, converged()...)
	s := NewSidecar(address, []*Rules{rules}, stats)

	err := s.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "address") || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("Sync error %v, want the address failure", err)
	}
	// fakeExec checks at cleanup that the rules were still read.
	if stats.SyncsFailed.Load() != 1 || stats.SyncsSucceeded.Load() != 0 {
		t.Errorf("stats: %d failed, %d succeeded; want 1, 0", stats.SyncsFailed.Load(), stats.SyncsSucceeded.Load())
	}
}

func TestSidecarRunKeepsGoingAfterFailures(t *testing.T) {
	nl := newFake(t, nil)
	nl.fail = map[string]error{"AddrAdd lo": errors.New("permission denied")}
	stats := &Counts{}
	s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), nil, stats)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		s.Run(ctx, time.Millisecond)
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
	calls := []call{{argv: "iptables-nft -t raw -S APISERVER-PROXY-PREROUTING", exit: 4, stderr: "Permission denied\n"}}
	rules, stats := newRules(t, BackendNFT, rs, nil, calls...)
	s := NewSidecar(NewAddress(nl, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.2")}), []*Rules{rules}, stats)
	err := s.Cleanup(context.Background())
	if err == nil || !strings.Contains(err.Error(), "IPv4 rules") {
		t.Fatalf("Cleanup error %v, want the rules failure", err)
	}
	if len(nl.calls) != 1 || !strings.HasPrefix(nl.calls[0], "AddrDel lo 10.96.0.2/32") {
		t.Errorf("address calls %q, want the address removed despite the rules failure", nl.calls)
	}
}
