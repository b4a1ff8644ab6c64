package apply

import (
	"context"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// TestRulesLegacyInProcess: with the legacy tables read in-process, a
// converged sync starts no program, an unchanged info skips the read, and
// a change is read, repaired with iptables-legacy-restore and read back.
func TestRulesLegacyInProcess(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t).loadLegacy(render.IPv4).converged(BackendLegacy, rs)
	n.legacyInProcess = true
	r, stats := n.rules(BackendLegacy, rs)
	ctx := context.Background()
	for i := range 2 {
		if drifts, err := r.Sync(ctx); err != nil || len(drifts) != 0 {
			t.Fatalf("sync %d: drifts %v, error %v", i+1, drifts, err)
		}
	}
	for _, ran := range n.ran {
		if ran != "" && !isNFT(ran) {
			t.Errorf("a converged legacy sync ran %q", ran)
		}
	}
	if got := stats.Skipped.Load(); got != 1 || n.legacyReads != 2 {
		t.Fatalf("%d syncs skipped and %d tables read in-process, want 1 and 2", got, n.legacyReads)
	}
	// Another agent deletes our jump: the info changes.
	n.mu.Lock()
	in := n.tables[nodeKey{BackendLegacy, render.IPv4}]["filter"].chains["INPUT"]
	in.rules = nil
	n.mu.Unlock()
	n.ran = nil
	drifts, err := r.Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := driftStrings(drifts); len(got) != 1 || got[0] != "filter jump APISERVER-PROXY-INPUT: missing from INPUT" {
		t.Errorf("drifts %v, want the INPUT jump missing", got)
	}
	if len(n.ran) != 1 || n.ran[0] != "iptables-legacy-restore --noflush --wait=5" {
		t.Errorf("ran %q, want one iptables-legacy-restore", n.ran)
	}
}

// TestRulesLegacyFallsBackToSave: when a table cannot be read in-process,
// iptables-legacy-save is.
func TestRulesLegacyFallsBackToSave(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t).loadLegacy(render.IPv4).converged(BackendLegacy, rs)
	r, _ := n.rules(BackendLegacy, rs)
	if drifts, err := r.Sync(context.Background()); err != nil || len(drifts) != 0 {
		t.Fatalf("drifts %v, error %v", drifts, err)
	}
	saves := 0
	for _, ran := range n.ran {
		if ran == "iptables-legacy-save -t raw" || ran == "iptables-legacy-save -t filter" {
			saves++
		}
	}
	if saves != 2 {
		t.Errorf("ran %q, want one iptables-legacy-save per table", n.ran)
	}
}

func isNFT(argv string) bool { return len(argv) >= 12 && argv[:12] == "iptables-nft" }

func TestLegacyChangeConcernsOnlyLegacy(t *testing.T) {
	if got := scopeOf(TriggerLegacyChange); got != (scope{rules: true}) {
		t.Errorf("scope of %s = %v, want rules only", TriggerLegacyChange, got)
	}
}
