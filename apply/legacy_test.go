package apply

import (
	"context"
	"fmt"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
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

// TestLegacyPollSeesRepairUndone: another writer deletes our jump, the
// poll sees it, a sync repairs it, and the writer deletes it again before
// the next poll. That poll reads the same info as the one before the
// repair; it reports a change only because the sync told the shared
// LegacySeen what its repair left. Without the sharing it would not, and
// the jump would stay missing until legacyTrust ran out.
func TestLegacyPollSeesRepairUndone(t *testing.T) {
	for _, shared := range []bool{true, false} {
		t.Run(fmt.Sprintf("shared=%v", shared), func(t *testing.T) {
			rs := ruleset(t, "10.96.0.2")
			n := newFakeNode(t).loadLegacy(render.IPv4).converged(BackendLegacy, rs)
			n.legacyInProcess = true
			r, _ := n.rules(BackendLegacy, rs)
			known := &LegacySeen{}
			if shared {
				r.SetLegacySeen(known)
			}
			var polls []legacyPoll
			for _, tbl := range rs.Tables {
				polls = append(polls, legacyPoll{render.IPv4, tbl.Name, func() (xtables.TableInfo, error) {
					return n.legacyInfo(render.IPv4, tbl.Name)
				}})
			}
			poll := func(what string) bool {
				t.Helper()
				changed, err := pollLegacy(polls, known)
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				return changed
			}
			deleteJump := func() {
				n.mu.Lock()
				defer n.mu.Unlock()
				n.tables[nodeKey{BackendLegacy, render.IPv4}]["filter"].chains["INPUT"].rules = nil
			}
			ctx := context.Background()
			poll("first poll")
			if _, err := r.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			if poll("converged") {
				t.Fatal("a poll of converged tables reported a change")
			}
			deleteJump()
			if !poll("after the deletion") {
				t.Fatal("the deleted jump was not seen")
			}
			if drifts, err := r.Sync(ctx); err != nil || len(drifts) != 1 {
				t.Fatalf("repair: drifts %v, error %v", drifts, err)
			}
			deleteJump()
			if got := poll("after the repair was undone"); got != shared {
				t.Fatalf("poll after the repair was undone reported a change: %v, want %v", got, shared)
			}
		})
	}
}
