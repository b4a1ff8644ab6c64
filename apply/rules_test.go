package apply

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

func ruleset(t *testing.T, addr string) *render.Ruleset {
	t.Helper()
	rs, err := render.RenderFamily([]netip.Addr{netip.MustParseAddr(addr)}, 443)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

func driftStrings(ds []Drift) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.String())
	}
	return out
}

// Our rules for the rendered 10.96.0.2:443, as `iptables -S` lists them.
const (
	preRule    = "-A APISERVER-PROXY-PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK"
	rawOutDst  = "-A APISERVER-PROXY-OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK"
	rawOutSrc  = "-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK"
	inRule     = "-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT"
	outRule    = "-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT"
	jumpPre    = "-A PREROUTING -j APISERVER-PROXY-PREROUTING"
	jumpRawOut = "-A OUTPUT -j APISERVER-PROXY-OUTPUT"
	jumpIn     = "-A INPUT -j APISERVER-PROXY-INPUT"
	jumpOut    = "-A OUTPUT -j APISERVER-PROXY-OUTPUT"

	restoreNFT    = "iptables-nft-restore --noflush --wait=5"
	restoreLegacy = "iptables-legacy-restore --noflush --wait=5"
)

// convergedRaw and convergedFilter are the tables of a node where the
// ruleset is in place, with a foreign rule or two.
func convergedRaw(n *fakeNode, b Backend, extra ...string) {
	n.set(b, render.IPv4, "raw", append([]string{
		"-N APISERVER-PROXY-PREROUTING", preRule,
		"-N APISERVER-PROXY-OUTPUT", rawOutDst, rawOutSrc,
		jumpPre, "-A PREROUTING -s 192.0.2.9/32 -j CT --notrack", jumpRawOut,
	}, extra...)...)
}

func convergedFilter(n *fakeNode, b Backend, extra ...string) {
	n.set(b, render.IPv4, "filter", append([]string{
		"-P INPUT DROP", "-N KUBE-FIREWALL",
		"-N APISERVER-PROXY-INPUT", inRule,
		"-N APISERVER-PROXY-OUTPUT", outRule,
		jumpIn, "-A INPUT -j KUBE-FIREWALL", "-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT",
		"-A OUTPUT -j KUBE-FIREWALL", jumpOut,
	}, extra...)...)
}

// foreign is Dump's part of the tables above that is not ours.
func foreign(b Backend) []string {
	p := string(b) + " IPv4 "
	return []string{
		p + "filter -P INPUT DROP",
		p + "filter -A INPUT -j KUBE-FIREWALL",
		p + "filter -A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT",
		p + "filter -P FORWARD ACCEPT",
		p + "filter -P OUTPUT ACCEPT",
		p + "filter -A OUTPUT -j KUBE-FIREWALL",
		p + "filter -N KUBE-FIREWALL",
		p + "raw -P PREROUTING ACCEPT",
		p + "raw -A PREROUTING -s 192.0.2.9/32 -j CT --notrack",
		p + "raw -P OUTPUT ACCEPT",
	}
}

// wantNode compares the node's ours() and the rest of its Dump with
// what a node holding exactly rs in backend b (and the foreign rules
// given) holds.
func wantNode(t *testing.T, n *fakeNode, b Backend, rs *render.Ruleset, foreign []string) {
	t.Helper()
	if diff := cmp.Diff(newFakeNode(t).converged(b, rs).ours(rs), n.ours(rs)); diff != "" {
		t.Errorf("our rules on the node (-want +got):\n%s", diff)
	}
	if foreign == nil {
		return
	}
	var got []string
	for _, line := range n.Dump() {
		if !isOurs(rs, line) {
			got = append(got, line)
		}
	}
	if diff := cmp.Diff(foreign, got); diff != "" {
		t.Errorf("foreign rules on the node (-want +got):\n%s", diff)
	}
}

// freshDrifts is what a sync finds on a node with nothing of ours.
var freshDrifts = []string{
	"raw chain APISERVER-PROXY-PREROUTING: missing",
	"raw chain APISERVER-PROXY-OUTPUT: missing",
	"raw jump APISERVER-PROXY-PREROUTING: missing from PREROUTING",
	"raw jump APISERVER-PROXY-OUTPUT: missing from OUTPUT",
	"filter chain APISERVER-PROXY-INPUT: missing",
	"filter chain APISERVER-PROXY-OUTPUT: missing",
	"filter jump APISERVER-PROXY-INPUT: missing from INPUT",
	"filter jump APISERVER-PROXY-OUTPUT: missing from OUTPUT",
}

func TestRulesSyncNFT(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	for _, tc := range []struct {
		name  string
		given func(n *fakeNode)
		// payload is the one restore's input; "" for no restore.
		payload string
		drifts  []string
		// after is the node's Dump of the built-in chain of its first
		// line, where order matters; nil: not checked beyond wantNode.
		after []string
		// keepsForeign: the foreign rules of convergedRaw and
		// convergedFilter are all there after the sync.
		keepsForeign bool
	}{
		{
			name:    "fresh node loads exactly the rendered payload",
			given:   func(*fakeNode) {},
			payload: string(rs.Payload()),
			drifts:  freshDrifts,
		},
		{
			name:         "converged node writes nothing",
			keepsForeign: true,
			given:        func(n *fakeNode) { convergedRaw(n, BackendNFT); convergedFilter(n, BackendNFT) },
		},
		{
			name:         "flushed chain is rewritten alone",
			keepsForeign: true,
			given: func(n *fakeNode) {
				n.set(BackendNFT, render.IPv4, "raw", "-N APISERVER-PROXY-PREROUTING", preRule, "-N APISERVER-PROXY-OUTPUT",
					jumpPre, "-A PREROUTING -s 192.0.2.9/32 -j CT --notrack", jumpRawOut)
				convergedFilter(n, BackendNFT)
			},
			payload: "*raw\n:APISERVER-PROXY-OUTPUT - [0:0]\n" + rawOutDst + "\n" + rawOutSrc + "\nCOMMIT\n",
			drifts:  []string{"raw chain APISERVER-PROXY-OUTPUT: rules differ (0 listed, 2 rendered)"},
		},
		{
			name:         "altered and extra rules are replaced",
			keepsForeign: true,
			given: func(n *fakeNode) {
				convergedRaw(n, BackendNFT)
				n.set(BackendNFT, render.IPv4, "filter", "-P INPUT DROP", "-N KUBE-FIREWALL",
					"-N APISERVER-PROXY-INPUT", "-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 444 -j ACCEPT",
					"-N APISERVER-PROXY-OUTPUT", outRule, "-A APISERVER-PROXY-OUTPUT -j DROP",
					jumpIn, "-A INPUT -j KUBE-FIREWALL", "-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT",
					"-A OUTPUT -j KUBE-FIREWALL", jumpOut)
			},
			payload: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n" + inRule + "\n" + outRule + "\nCOMMIT\n",
			drifts: []string{
				"filter chain APISERVER-PROXY-INPUT: rules differ (1 listed, 1 rendered)",
				"filter chain APISERVER-PROXY-OUTPUT: rules differ (2 listed, 1 rendered)",
			},
		},
		{
			name:         "deleted jump is inserted at the top",
			keepsForeign: true,
			given: func(n *fakeNode) {
				convergedRaw(n, BackendNFT)
				n.set(BackendNFT, render.IPv4, "filter", "-P INPUT DROP", "-N KUBE-FIREWALL",
					"-N APISERVER-PROXY-INPUT", inRule, "-N APISERVER-PROXY-OUTPUT", outRule,
					"-A INPUT -j KUBE-FIREWALL", "-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT",
					"-A OUTPUT -j KUBE-FIREWALL", jumpOut)
			},
			payload: "*filter\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n",
			drifts:  []string{"filter jump APISERVER-PROXY-INPUT: missing from INPUT"},
			after:   []string{"nft IPv4 filter -P INPUT DROP", "nft IPv4 filter " + jumpIn, "nft IPv4 filter -A INPUT -j KUBE-FIREWALL", "nft IPv4 filter -A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT"},
		},
		{
			name: "duplicated jump is deleted everywhere and inserted once",
			given: func(n *fakeNode) {
				n.set(BackendNFT, render.IPv4, "raw", "-N APISERVER-PROXY-PREROUTING", preRule,
					"-N APISERVER-PROXY-OUTPUT", rawOutDst, rawOutSrc, "-N KUBE-X",
					jumpPre, "-A PREROUTING -j KUBE-X", jumpPre, jumpPre, jumpRawOut)
				convergedFilter(n, BackendNFT)
			},
			payload: "*raw\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-I PREROUTING -j APISERVER-PROXY-PREROUTING\nCOMMIT\n",
			drifts:  []string{"raw jump APISERVER-PROXY-PREROUTING: 3 copies in PREROUTING"},
			after:   []string{"nft IPv4 raw -P PREROUTING ACCEPT", "nft IPv4 raw " + jumpPre, "nft IPv4 raw -A PREROUTING -j KUBE-X"},
		},
		{
			name: "altered jump is replaced, foreign rules in the hook are not read as ours",
			given: func(n *fakeNode) {
				convergedRaw(n, BackendNFT)
				n.set(BackendNFT, render.IPv4, "filter", "-P INPUT DROP",
					"-N APISERVER-PROXY-INPUT", inRule, "-N APISERVER-PROXY-OUTPUT", outRule, "-N APISERVER-PROXY-INPUTX",
					"-A INPUT -i eth0 -j APISERVER-PROXY-INPUT", "-A INPUT -j APISERVER-PROXY-INPUTX",
					`-A INPUT -m comment --comment "-j APISERVER-PROXY-INPUT" -j ACCEPT`, jumpOut)
			},
			payload: "*filter\n-D INPUT -i eth0 -j APISERVER-PROXY-INPUT\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n",
			drifts: []string{
				`filter jump APISERVER-PROXY-INPUT: unexpected rule "-A INPUT -i eth0 -j APISERVER-PROXY-INPUT"`,
				"filter jump APISERVER-PROXY-INPUT: missing from INPUT",
			},
			after: []string{"nft IPv4 filter -P INPUT DROP", "nft IPv4 filter " + jumpIn, "nft IPv4 filter -A INPUT -j APISERVER-PROXY-INPUTX",
				`nft IPv4 filter -A INPUT -m comment --comment "-j APISERVER-PROXY-INPUT" -j ACCEPT`},
		},
		{
			name: "jump below a foreign rule is left where it is",
			given: func(n *fakeNode) {
				n.set(BackendNFT, render.IPv4, "raw", "-N APISERVER-PROXY-PREROUTING", preRule,
					"-N APISERVER-PROXY-OUTPUT", rawOutDst, rawOutSrc, "-N CILIUM-PRE-raw",
					"-A PREROUTING -j CILIUM-PRE-raw", jumpPre, jumpRawOut)
				convergedFilter(n, BackendNFT)
			},
			after: []string{"nft IPv4 raw -P PREROUTING ACCEPT", "nft IPv4 raw -A PREROUTING -j CILIUM-PRE-raw", "nft IPv4 raw " + jumpPre},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(t)
			tc.given(n)
			r, stats := n.rules(BackendNFT, rs)
			drifts, err := r.Sync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.drifts, driftStrings(drifts)); diff != "" {
				t.Errorf("drifts (-want +got):\n%s", diff)
			}
			var want []string
			if tc.payload != "" {
				want = []string{tc.payload}
			}
			if diff := cmp.Diff(want, n.payloads); diff != "" {
				t.Errorf("restore input (-want +got):\n%s", diff)
			}
			if got := stats.Restores.Load(); got != int64(len(want)) {
				t.Errorf("%d restores counted, want %d", got, len(want))
			}
			wantNode(t, n, BackendNFT, rs, nil)
			if tc.keepsForeign {
				wantNode(t, n, BackendNFT, rs, foreign(BackendNFT))
			}
			if tc.after != nil {
				// "nft IPv4 filter -P INPUT DROP": the chain is the 5th word.
				w := strings.Fields(tc.after[0])
				var got []string
				for _, line := range n.Dump() {
					if f := strings.Fields(line); f[2] == w[2] && f[4] == w[4] {
						got = append(got, line)
					}
				}
				if diff := cmp.Diff(tc.after, got); diff != "" {
					t.Errorf("built-in chain after the sync (-want +got):\n%s", diff)
				}
			}
			// Whatever the sync wrote, the next one finds in place.
			if d, err := r.Sync(context.Background()); err != nil || len(d) != 0 {
				t.Errorf("second sync: drifts %v, error %v; want none", driftStrings(d), err)
			}
		})
	}
}

// The argv is the point: a sync that finds everything in place (read over
// nfnetlink) starts no program at all.
func TestRulesConvergedSyncStartsNothing(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t).converged(BackendNFT, rs)
	n.genErr = errors.New("no generation: every sync reads")
	r, _ := n.rules(BackendNFT, rs)
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i+1, err)
		}
		if ran := n.takeRan(); len(ran) != 0 {
			t.Errorf("sync %d ran %q, want nothing", i+1, ran)
		}
	}
}

func TestRulesSyncIPv6UsesIP6Tables(t *testing.T) {
	rs := ruleset(t, "fd00::2")
	n := newFakeNode(t)
	r, _ := n.rules(BackendNFT, rs)
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"ip6tables-nft-restore --noflush --wait=5"}, n.takeRan()); diff != "" {
		t.Errorf("programs run (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{string(rs.Payload())}, n.payloads); diff != "" {
		t.Errorf("restore input (-want +got):\n%s", diff)
	}
	wantNode(t, n, BackendNFT, rs, nil)
	for _, line := range n.Dump() {
		if strings.HasPrefix(line, "nft IPv4") {
			t.Errorf("IPv4 table touched: %s", line)
		}
	}
}

func TestRulesSyncFailures(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	for _, tc := range []struct {
		name       string
		given      func(n *fakeNode)
		wantErr    string
		toolError  bool
		lockHeld   bool
		failures   int64
		wantDump   func(n *fakeNode) []string // the node after: nil for unchanged
		wantNoRead bool
	}{
		{
			name: "restore failure carries iptables' stderr",
			given: func(n *fakeNode) {
				n.faults["iptables-nft-restore"] = fault{exit: 2, stderr: "iptables-restore v1.8.9 (nf_tables): unknown option \"--dport\"\nError occurred at line: 4\n"}
			},
			wantErr:   `iptables-nft-restore --noflush --wait=5: exit 2: iptables-restore v1.8.9 (nf_tables): unknown option "--dport" Error occurred at line: 4`,
			toolError: true,
			failures:  1,
		},
		{
			name: "held lock is reported as such",
			given: func(n *fakeNode) {
				n.faults["iptables-nft-restore"] = fault{exit: 4, stderr: "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n"}
			},
			wantErr:   "Another app is currently holding the xtables lock",
			toolError: true,
			lockHeld:  true,
			failures:  1,
		},
		{
			name: "failed listing writes nothing",
			given: func(n *fakeNode) {
				n.converged(BackendNFT, rs)
				n.unknownExprs = true // our chains are listed with iptables-nft
				n.faults["iptables-nft"] = fault{exit: 4, stderr: "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n"}
			},
			wantErr:   "Permission denied",
			toolError: true,
		},
		{
			name:    "failed nfnetlink read writes nothing",
			given:   func(n *fakeNode) { n.nfnlErr = errors.New("listing nftables chain: operation not permitted") },
			wantErr: "operation not permitted",
		},
		{
			name: "failed read of a built-in chain writes nothing",
			given: func(n *fakeNode) {
				n.converged(BackendNFT, rs)
				// A jump of another form in PREROUTING: the chain is listed.
				n.set(BackendNFT, render.IPv4, "raw", "-A PREROUTING -i eth0 -j APISERVER-PROXY-PREROUTING")
				n.faults["iptables-nft"] = fault{exit: 1, stderr: "iptables: No chain/target/match by that name.\n"}
			},
			wantErr:   "No chain/target/match by that name",
			toolError: true,
		},
		{
			name: "a listing that is not one writes nothing",
			given: func(n *fakeNode) {
				n.converged(BackendNFT, rs)
				n.unknownExprs = true
				n.faults["iptables-nft"] = fault{stdout: "Usage: iptables ...\n"}
			},
			wantErr:   `exited 0 with no "-N APISERVER-PROXY-PREROUTING" or "-P APISERVER-PROXY-PREROUTING" line in 1 lines of output (the first: "Usage: iptables ..."): not a listing`,
			toolError: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(t)
			tc.given(n)
			before := n.Dump()
			r, stats := n.rules(BackendNFT, rs)
			_, err := r.Sync(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			var te *ToolError
			if errors.As(err, &te) != tc.toolError {
				t.Errorf("error %T: is a *ToolError = %v, want %v", err, !tc.toolError, tc.toolError)
			}
			if IsLockHeld(err) != tc.lockHeld {
				t.Errorf("IsLockHeld = %v, want %v", IsLockHeld(err), tc.lockHeld)
			}
			if got := stats.RestoreFailures.Load(); got != tc.failures {
				t.Errorf("%d restore failures counted, want %d", got, tc.failures)
			}
			if tc.lockHeld && stats.LockHeld.Load() != 1 {
				t.Errorf("lock wait not counted")
			}
			if tc.failures == 0 && len(n.payloads) != 0 {
				t.Errorf("restored %q after a failed read", n.payloads)
			}
			if diff := cmp.Diff(before, n.Dump()); diff != "" {
				t.Errorf("node changed (-before +after):\n%s", diff)
			}
		})
	}
}

// A program that hangs is killed at the timeout, and the sync fails.
func TestRulesHungProgramIsKilled(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t)
	n.faults["iptables-nft-restore"] = fault{hang: true}
	r, _ := n.rules(BackendNFT, rs)
	r.SetTimeout(50 * time.Millisecond)
	_, err := r.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "killed after 50ms") {
		t.Fatalf("error %v, want the restore killed after 50ms", err)
	}
	if len(n.ours(rs)) != 0 {
		t.Errorf("the node holds %q after a killed restore", n.ours(rs))
	}
}

// legacyRaw and legacyFilter are legacy tables with everyone's rules; a
// sync keeps only ours from the one iptables-legacy-save of each.
func legacyRaw(n *fakeNode) {
	n.set(BackendLegacy, render.IPv4, "raw", "-N APISERVER-PROXY-OUTPUT", "-N APISERVER-PROXY-PREROUTING", "-N CILIUM-RAW",
		jumpPre, "-A PREROUTING -j CILIUM-RAW", jumpRawOut, rawOutDst, rawOutSrc, preRule, "-A CILIUM-RAW -j APISERVER-PROXY-OUTPUT")
}

func legacyFilter(n *fakeNode) {
	n.set(BackendLegacy, render.IPv4, "filter", "-P INPUT DROP", "-N APISERVER-PROXY-INPUT", "-N KUBE-FIREWALL",
		"-A INPUT -j KUBE-FIREWALL", jumpIn, "-A KUBE-FIREWALL -d 10.96.0.2/32 -j APISERVER-PROXY-INPUT", inRule)
}

func TestRulesSyncLegacy(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	t.Run("converged raw, missing filter chain and jump: one save per table, one restore", func(t *testing.T) {
		n := newFakeNode(t)
		legacyRaw(n)
		legacyFilter(n)
		n.set(BackendLegacy, render.IPv4, "mangle")
		r, _ := n.rules(BackendLegacy, rs)
		drifts, err := r.Sync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"filter chain APISERVER-PROXY-OUTPUT: missing", "filter jump APISERVER-PROXY-OUTPUT: missing from OUTPUT"}
		if diff := cmp.Diff(want, driftStrings(drifts)); diff != "" {
			t.Errorf("drifts (-want +got):\n%s", diff)
		}
		// The argv is the point: -save reads a table once and takes no
		// lock; the read-back reads each table once more. After the
		// write, looking for ours in nft runs nothing (nfnetlink).
		ran := []string{"iptables-legacy-save -t raw", "iptables-legacy-save -t filter", restoreLegacy,
			"iptables-legacy-save -t raw", "iptables-legacy-save -t filter"}
		if diff := cmp.Diff(ran, n.takeRan()); diff != "" {
			t.Errorf("programs run (-want +got):\n%s", diff)
		}
		payload := "*filter\n:APISERVER-PROXY-OUTPUT - [0:0]\n" + outRule + "\n-I OUTPUT -j APISERVER-PROXY-OUTPUT\nCOMMIT\n"
		if diff := cmp.Diff([]string{payload}, n.payloads); diff != "" {
			t.Errorf("restore input (-want +got):\n%s", diff)
		}
		// The foreign rules stay, those that target our chains from
		// chains of their own included.
		wantNode(t, n, BackendLegacy, rs, []string{
			"legacy IPv4 filter -P INPUT DROP",
			"legacy IPv4 filter -A INPUT -j KUBE-FIREWALL",
			"legacy IPv4 filter -P FORWARD ACCEPT",
			"legacy IPv4 filter -P OUTPUT ACCEPT",
			"legacy IPv4 filter -N KUBE-FIREWALL",
			"legacy IPv4 filter -A KUBE-FIREWALL -d 10.96.0.2/32 -j APISERVER-PROXY-INPUT",
			"legacy IPv4 mangle -P PREROUTING ACCEPT",
			"legacy IPv4 mangle -P INPUT ACCEPT",
			"legacy IPv4 mangle -P FORWARD ACCEPT",
			"legacy IPv4 mangle -P OUTPUT ACCEPT",
			"legacy IPv4 mangle -P POSTROUTING ACCEPT",
			"legacy IPv4 raw -P PREROUTING ACCEPT",
			"legacy IPv4 raw -A PREROUTING -j CILIUM-RAW",
			"legacy IPv4 raw -P OUTPUT ACCEPT",
			"legacy IPv4 raw -N CILIUM-RAW",
			"legacy IPv4 raw -A CILIUM-RAW -j APISERVER-PROXY-OUTPUT",
		})
	})
	t.Run("fresh node: only the tables the kernel lists are read", func(t *testing.T) {
		n := newFakeNode(t)
		n.set(BackendLegacy, render.IPv4, "raw") // the restore creates filter
		r, _ := n.rules(BackendLegacy, rs)
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		ran := []string{"iptables-legacy-save -t raw", restoreLegacy, "iptables-legacy-save -t raw", "iptables-legacy-save -t filter"}
		if diff := cmp.Diff(ran, n.takeRan()); diff != "" {
			t.Errorf("programs run (-want +got):\n%s", diff)
		}
		if diff := cmp.Diff([]string{string(rs.Payload())}, n.payloads); diff != "" {
			t.Errorf("restore input (-want +got):\n%s", diff)
		}
		wantNode(t, n, BackendLegacy, rs, nil)
	})
}

func TestRulesCleanup(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	t.Run("removes our chains and every jump to them, nothing else", func(t *testing.T) {
		n := newFakeNode(t)
		n.set(BackendNFT, render.IPv4, "raw", "-N APISERVER-PROXY-PREROUTING", preRule,
			"-N APISERVER-PROXY-OUTPUT", rawOutDst, rawOutSrc, "-N KUBE-X",
			jumpPre, "-A PREROUTING -j KUBE-X", jumpPre, jumpRawOut)
		n.set(BackendNFT, render.IPv4, "filter", "-N APISERVER-PROXY-INPUT", inRule, jumpIn)
		r, _ := n.rules(BackendNFT, rs)
		removed, err := r.Cleanup(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		payload := "*raw\n:APISERVER-PROXY-PREROUTING - [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
			"-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D OUTPUT -j APISERVER-PROXY-OUTPUT\n" +
			"-X APISERVER-PROXY-PREROUTING\n-X APISERVER-PROXY-OUTPUT\nCOMMIT\n" +
			"*filter\n:APISERVER-PROXY-INPUT - [0:0]\n-D INPUT -j APISERVER-PROXY-INPUT\n-X APISERVER-PROXY-INPUT\nCOMMIT\n"
		if diff := cmp.Diff([]string{payload}, n.payloads); diff != "" {
			t.Errorf("restore input (-want +got):\n%s", diff)
		}
		if len(removed) != 7 {
			t.Errorf("removed %v, want 3 chains and 4 jumps", removed)
		}
		want := []string{
			"nft IPv4 filter -P INPUT ACCEPT", "nft IPv4 filter -P FORWARD ACCEPT", "nft IPv4 filter -P OUTPUT ACCEPT",
			"nft IPv4 raw -P PREROUTING ACCEPT", "nft IPv4 raw -A PREROUTING -j KUBE-X", "nft IPv4 raw -P OUTPUT ACCEPT", "nft IPv4 raw -N KUBE-X",
		}
		if diff := cmp.Diff(want, n.Dump()); diff != "" {
			t.Errorf("node after Cleanup (-want +got):\n%s", diff)
		}
	})
	t.Run("nothing of ours: no write", func(t *testing.T) {
		n := newFakeNode(t)
		n.set(BackendNFT, render.IPv4, "filter", "-N KUBE-FIREWALL", "-A INPUT -j KUBE-FIREWALL")
		before := n.Dump()
		r, _ := n.rules(BackendNFT, rs)
		if _, err := r.Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
		if ran := n.takeRan(); len(ran) != 0 {
			t.Errorf("ran %q, want nothing", ran)
		}
		if diff := cmp.Diff(before, n.Dump()); diff != "" {
			t.Errorf("node changed (-before +after):\n%s", diff)
		}
	})
}

func TestLineWriterSplitsAcrossWrites(t *testing.T) {
	var got []string
	w := &lineWriter{fn: func(b []byte) { got = append(got, string(b)) }}
	for _, chunk := range []string{"-A IN", "PUT -j X\n-A OUT", "PUT\n\n", "tail"} {
		w.Write([]byte(chunk))
	}
	w.flush()
	want := []string{"-A INPUT -j X", "-A OUTPUT", "", "tail"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
}

func TestRulesSkipWhileGenerationUnchanged(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t).converged(BackendNFT, rs)
	r, stats := n.rules(BackendNFT, rs)
	// 1: converged, generation recorded. 2: same generation, nothing
	// read. 3: a jump is deleted (the generation moves): read, written,
	// read back. 4: another writer moves the generation: read,
	// converged. 5: skipped.
	steps := []struct {
		before func()
		reads  bool
	}{
		{func() {}, true},
		{func() {}, false},
		{func() {
			n.clear(BackendNFT, render.IPv4)
			n.converged(BackendNFT, rs)
			n.tables[nodeKey{BackendNFT, render.IPv4}]["filter"].chains["INPUT"].rules = nil
		}, true},
		{n.touch, true},
		{func() {}, false},
	}
	for i, s := range steps {
		s.before()
		reads := n.nfnlReads
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i+1, err)
		}
		if read := n.nfnlReads > reads; read != s.reads {
			t.Errorf("sync %d read the rules: %v, want %v", i+1, read, s.reads)
		}
	}
	if got := stats.Skipped.Load(); got != 2 {
		t.Errorf("%d syncs skipped, want 2", got)
	}
	if diff := cmp.Diff([]string{"*filter\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n"}, n.payloads); diff != "" {
		t.Errorf("restore input (-want +got):\n%s", diff)
	}
	wantNode(t, n, BackendNFT, rs, nil)
}

func TestRulesReadWhenGenerationFails(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t).converged(BackendNFT, rs)
	n.genErr = errors.New("operation not permitted")
	r, stats := n.rules(BackendNFT, rs)
	for i := range 2 {
		reads := n.nfnlReads
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i+1, err)
		}
		if n.nfnlReads == reads {
			t.Errorf("sync %d did not read the rules", i+1)
		}
	}
	if stats.Skipped.Load() != 0 {
		t.Error("a sync was skipped without a generation")
	}
}

// storedAsRendered is what the nftables expressions of our chains are when
// they hold the rendered rules.
func storedAsRendered(t *testing.T, rs *render.Ruleset) map[string][][]string {
	t.Helper()
	out := map[string][][]string{}
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			var rules [][]string
			for _, rule := range c.Rules {
				e, ok := wantExprs(rs.Family, rule)
				if !ok {
					t.Fatalf("no expressions for %q", rule)
				}
				rules = append(rules, e)
			}
			out[tb.Name+"/"+c.Name] = rules
		}
	}
	return out
}

// What runs when the nft backend is read in-process: only what the
// nfnetlink reads cannot settle is listed, and the argv is the point.
func TestRulesSyncNFTReadsInProcess(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	listing := func(table, chain string) string { return "iptables-nft -t " + table + " -S " + chain }
	for _, tc := range []struct {
		name    string
		given   func(n *fakeNode)
		ran     []string
		payload string
		drifts  []string
	}{
		{
			name:  "converged but stored in a form we do not know: our four chains are listed, the built-in chains are not",
			given: func(n *fakeNode) { n.converged(BackendNFT, rs); n.unknownExprs = true },
			ran: []string{listing("raw", "APISERVER-PROXY-PREROUTING"), listing("raw", "APISERVER-PROXY-OUTPUT"),
				listing("filter", "APISERVER-PROXY-INPUT"), listing("filter", "APISERVER-PROXY-OUTPUT")},
		},
		{
			name: "a flushed chain is rewritten without any listing",
			given: func(n *fakeNode) {
				n.converged(BackendNFT, rs)
				n.tables[nodeKey{BackendNFT, render.IPv4}]["filter"].chains["APISERVER-PROXY-INPUT"].rules = nil
			},
			ran:     []string{restoreNFT},
			payload: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n" + inRule + "\nCOMMIT\n",
			drifts:  []string{"filter chain APISERVER-PROXY-INPUT: rules differ (0 listed, 1 rendered)"},
		},
		{
			name:    "fresh node: nothing is listed, the payload is loaded",
			given:   func(*fakeNode) {},
			ran:     []string{restoreNFT},
			payload: string(rs.Payload()),
			drifts:  freshDrifts,
		},
		{
			name:    "duplicated bare jump is repaired without listing the built-in chain",
			given:   func(n *fakeNode) { n.converged(BackendNFT, rs); n.set(BackendNFT, render.IPv4, "filter", jumpIn) },
			ran:     []string{restoreNFT},
			payload: "*filter\n-D INPUT -j APISERVER-PROXY-INPUT\n-D INPUT -j APISERVER-PROXY-INPUT\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n",
			drifts:  []string{"filter jump APISERVER-PROXY-INPUT: 2 copies in INPUT"},
		},
		{
			name: "a jump of another form is listed as text, to be deleted as printed",
			given: func(n *fakeNode) {
				n.converged(BackendNFT, rs)
				n.tables[nodeKey{BackendNFT, render.IPv4}]["filter"].chains["OUTPUT"].rules = []string{"-A OUTPUT -g APISERVER-PROXY-OUTPUT"}
			},
			ran:     []string{listing("filter", "OUTPUT"), restoreNFT},
			payload: "*filter\n-D OUTPUT -g APISERVER-PROXY-OUTPUT\n-I OUTPUT -j APISERVER-PROXY-OUTPUT\nCOMMIT\n",
			drifts: []string{
				`filter jump APISERVER-PROXY-OUTPUT: unexpected rule "-A OUTPUT -g APISERVER-PROXY-OUTPUT"`,
				"filter jump APISERVER-PROXY-OUTPUT: missing from OUTPUT",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(t)
			tc.given(n)
			r, _ := n.rules(BackendNFT, rs)
			drifts, err := r.Sync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.drifts, driftStrings(drifts)); diff != "" {
				t.Errorf("drifts (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.ran, n.takeRan()); diff != "" {
				t.Errorf("programs run (-want +got):\n%s", diff)
			}
			var payloads []string
			if tc.payload != "" {
				payloads = []string{tc.payload}
			}
			if diff := cmp.Diff(payloads, n.payloads); diff != "" {
				t.Errorf("restore input (-want +got):\n%s", diff)
			}
			wantNode(t, n, BackendNFT, rs, nil)
		})
	}
}

// A restore that exits 0 without loading anything must not pass for a
// repair: the read-back after it finds the same drift and fails the sync,
// and nothing is written a second time.
func TestRulesReadBackCatchesARestoreThatLoadedNothing(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	n := newFakeNode(t)
	n.faults["iptables-nft-restore"] = fault{}
	r, stats := n.rules(BackendNFT, rs)
	drifts, err := r.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "rules still differ right after iptables-nft-restore succeeded") {
		t.Fatalf("error %v, want one saying the rules still differ after the restore", err)
	}
	if len(drifts) != 8 {
		t.Errorf("%d drifts returned, want the 8 the write was for", len(drifts))
	}
	if got := stats.Restores.Load(); got != 1 {
		t.Errorf("%d restores ran, want 1", got)
	}
	if diff := cmp.Diff([]string{restoreNFT}, n.takeRan()); diff != "" {
		t.Errorf("programs run (-want +got):\n%s", diff)
	}
}

func TestRuleSpecLines(t *testing.T) {
	s := listed("-A INPUT -i eth0 -j APISERVER-PROXY-INPUT")
	if s != (ruleSpec{chain: "INPUT", spec: "-i eth0 -j APISERVER-PROXY-INPUT"}) {
		t.Fatalf("listed = %+v", s)
	}
	got := []string{s.appendLine(), s.insertLine(), s.deleteLine(), listed("-A INPUT").deleteLine()}
	want := []string{
		"-A INPUT -i eth0 -j APISERVER-PROXY-INPUT",
		"-I INPUT -i eth0 -j APISERVER-PROXY-INPUT",
		"-D INPUT -i eth0 -j APISERVER-PROXY-INPUT",
		"-D INPUT",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("lines (-want +got):\n%s", diff)
	}
}
