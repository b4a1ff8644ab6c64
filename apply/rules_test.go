package apply

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	utilexec "k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// call is one expected run of an iptables program and what it answers.
type call struct {
	argv   string // program and arguments, space-separated
	stdin  string // expected stdin; "" for none
	stdout string
	stderr string
	exit   int
	run    func() // called when the program runs; nil for nothing
}

// fakeExec returns an exec fake that expects exactly calls, in order, and
// checks each one's arguments and stdin.
func fakeExec(t *testing.T, calls ...call) utilexec.Interface {
	t.Helper()
	fe := &testingexec.FakeExec{ExactOrder: true}
	for i, c := range calls {
		fe.CommandScript = append(fe.CommandScript, func(name string, args ...string) utilexec.Cmd {
			got := strings.Join(append([]string{name}, args...), " ")
			if got != c.argv {
				t.Errorf("call %d: ran %q, want %q", i, got, c.argv)
			}
			fc := &testingexec.FakeCmd{Argv: append([]string{name}, args...)}
			fc.RunScript = []testingexec.FakeAction{func() ([]byte, []byte, error) {
				if c.run != nil {
					c.run()
				}
				stdin := ""
				if fc.Stdin != nil {
					b, _ := io.ReadAll(fc.Stdin)
					stdin = string(b)
				}
				if diff := cmp.Diff(c.stdin, stdin); diff != "" {
					t.Errorf("call %d (%s): stdin (-want +got):\n%s", i, c.argv, diff)
				}
				var err error
				if c.exit != 0 {
					err = testingexec.FakeExitError{Status: c.exit}
				}
				return []byte(c.stdout), []byte(c.stderr), err
			}}
			return fc
		})
	}
	fe.LookPathFunc = func(name string) (string, error) { return "/usr/sbin/" + name, nil }
	t.Cleanup(func() {
		if fe.CommandCalls != len(calls) {
			t.Errorf("ran %d programs, want %d", fe.CommandCalls, len(calls))
		}
	})
	return fe
}

// newRules returns Rules on the exec fake, with /proc files read from proc
// (a missing name does not exist: no legacy iptables in the kernel).
func newRules(t *testing.T, b Backend, rs *render.Ruleset, proc map[string]string, calls ...call) (*Rules, *Counts) {
	t.Helper()
	stats := &Counts{}
	r := NewRules(fakeExec(t, calls...), b, rs, stats)
	r.run.readFile = fakeProc(proc)
	r.generation = nil // tests of the generation set their own
	r.run.nft = nil    // the fake runs programs; nftables_netns_test.go reads the kernel
	return r, stats
}

func fakeProc(files map[string]string) func(string) ([]byte, error) {
	return func(name string) ([]byte, error) {
		if s, ok := files[name]; ok {
			return []byte(s), nil
		}
		return nil, fs.ErrNotExist
	}
}

func ruleset(t *testing.T, addr string) *render.Ruleset {
	t.Helper()
	rs, err := render.RenderFamily([]netip.Addr{netip.MustParseAddr(addr)}, 443)
	if err != nil {
		t.Fatal(err)
	}
	return rs
}

// Listings as iptables-nft 1.8.9 prints them for the rendered 10.96.0.2:443.
const (
	notFound     = "iptables v1.8.9 (nf_tables): chain `X' in table `raw' is incompatible, use 'nft' tool.\n"
	rawPre       = "-N APISERVER-PROXY-PREROUTING\n-A APISERVER-PROXY-PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK\n"
	rawOut       = "-N APISERVER-PROXY-OUTPUT\n-A APISERVER-PROXY-OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK\n-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK\n"
	filterIn     = "-N APISERVER-PROXY-INPUT\n-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT\n"
	filterOut    = "-N APISERVER-PROXY-OUTPUT\n-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT\n"
	hookPre      = "-P PREROUTING ACCEPT\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n-A PREROUTING -s 192.0.2.9/32 -j CT --notrack\n"
	hookRawOut   = "-P OUTPUT ACCEPT\n-A OUTPUT -j APISERVER-PROXY-OUTPUT\n"
	hookIn       = "-P INPUT DROP\n-A INPUT -j APISERVER-PROXY-INPUT\n-A INPUT -j KUBE-FIREWALL\n-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT\n"
	hookOut      = "-P OUTPUT ACCEPT\n-A OUTPUT -j KUBE-FIREWALL\n-A OUTPUT -j APISERVER-PROXY-OUTPUT\n"
	restoreNFT   = "iptables-nft-restore --noflush --wait=5"
	restoreNFTv6 = "ip6tables-nft-restore --noflush --wait=5"
)

// nftListing returns the eight reads of one nft sync, answering each chain
// with the given listing ("" = the chain does not exist).
func nftListing(bin, pre, out, hPre, hOut, in, fOut, hIn, hFOut string) []call {
	chain := func(table, chain, listing string) call {
		c := call{argv: bin + " -t " + table + " -S " + chain, stdout: listing}
		if listing == "" {
			c.exit, c.stderr = 1, notFound
		}
		return c
	}
	return []call{
		chain("raw", "APISERVER-PROXY-PREROUTING", pre),
		chain("raw", "APISERVER-PROXY-OUTPUT", out),
		{argv: bin + " -t raw -S PREROUTING", stdout: hPre},
		{argv: bin + " -t raw -S OUTPUT", stdout: hOut},
		chain("filter", "APISERVER-PROXY-INPUT", in),
		chain("filter", "APISERVER-PROXY-OUTPUT", fOut),
		{argv: bin + " -t filter -S INPUT", stdout: hIn},
		{argv: bin + " -t filter -S OUTPUT", stdout: hFOut},
	}
}

const ipTablesNames = "/proc/net/ip_tables_names"

// noneOfOursNFT is an nft read of a node without anything of ours.
func noneOfOursNFT(bin string) []call {
	return nftListing(bin, "", "", "-P PREROUTING ACCEPT\n", "-P OUTPUT ACCEPT\n", "", "", "-P INPUT ACCEPT\n", "-P OUTPUT ACCEPT\n")
}

func converged() []call {
	return nftListing("iptables-nft", rawPre, rawOut, hookPre, hookRawOut, filterIn, filterOut, hookIn, hookOut)
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

// readBack is what a sync reads right after its write: with nft (listed
// with iptables-nft -S) the listings of a node where everything is in place.
func readBack() []call { return converged() }

// legacyConverged is the read of a legacy node where everything is in place.
func legacyConverged() []call {
	return []call{
		{argv: "iptables-legacy-save -t raw", stdout: legacyRawSave},
		{argv: "iptables-legacy-save -t filter", stdout: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
			"-A INPUT -j APISERVER-PROXY-INPUT\n-A OUTPUT -j APISERVER-PROXY-OUTPUT\n" +
			"-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT\n" +
			"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT\nCOMMIT\n"},
	}
}

func TestRulesSyncNFT(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	for _, tc := range []struct {
		name   string
		calls  []call
		drifts []string
	}{
		{
			name: "fresh node loads exactly the rendered payload",
			calls: append(nftListing("iptables-nft", "", "", "-P PREROUTING ACCEPT\n", "-P OUTPUT ACCEPT\n", "", "", "-P INPUT ACCEPT\n", "-P OUTPUT ACCEPT\n"),
				call{argv: restoreNFT, stdin: string(rs.Payload())}),
			drifts: freshDrifts,
		},
		{
			name:  "converged node writes nothing",
			calls: converged(),
		},
		{
			name: "flushed chain is rewritten alone",
			calls: append(nftListing("iptables-nft", rawPre, "-N APISERVER-PROXY-OUTPUT\n", hookPre, hookRawOut, filterIn, filterOut, hookIn, hookOut),
				call{argv: restoreNFT, stdin: "*raw\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
					"-A APISERVER-PROXY-OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK\n" +
					"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK\nCOMMIT\n"}),
			drifts: []string{"raw chain APISERVER-PROXY-OUTPUT: rules differ (0 listed, 2 rendered)"},
		},
		{
			name: "altered and extra rules are replaced",
			calls: append(nftListing("iptables-nft", rawPre, rawOut, hookPre, hookRawOut,
				"-N APISERVER-PROXY-INPUT\n-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 444 -j ACCEPT\n",
				filterOut+"-A APISERVER-PROXY-OUTPUT -j DROP\n", hookIn, hookOut),
				call{argv: restoreNFT, stdin: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
					"-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT\n" +
					"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT\nCOMMIT\n"}),
			drifts: []string{
				"filter chain APISERVER-PROXY-INPUT: rules differ (1 listed, 1 rendered)",
				"filter chain APISERVER-PROXY-OUTPUT: rules differ (2 listed, 1 rendered)",
			},
		},
		{
			name: "deleted jump is inserted at the top",
			calls: append(nftListing("iptables-nft", rawPre, rawOut, hookPre, hookRawOut, filterIn, filterOut,
				"-P INPUT DROP\n-A INPUT -j KUBE-FIREWALL\n", hookOut),
				call{argv: restoreNFT, stdin: "*filter\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n"}),
			drifts: []string{"filter jump APISERVER-PROXY-INPUT: missing from INPUT"},
		},
		{
			name: "duplicated jump is deleted everywhere and inserted once",
			calls: append(nftListing("iptables-nft", rawPre, rawOut, "-P PREROUTING ACCEPT\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n-A PREROUTING -j KUBE-X\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n",
				hookRawOut, filterIn, filterOut, hookIn, hookOut),
				call{argv: restoreNFT, stdin: "*raw\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-I PREROUTING -j APISERVER-PROXY-PREROUTING\nCOMMIT\n"}),
			drifts: []string{"raw jump APISERVER-PROXY-PREROUTING: 3 copies in PREROUTING"},
		},
		{
			name: "altered jump is replaced, foreign rules in the hook are not read as ours",
			calls: append(nftListing("iptables-nft", rawPre, rawOut, hookPre, hookRawOut, filterIn, filterOut,
				"-P INPUT DROP\n-A INPUT -i eth0 -j APISERVER-PROXY-INPUT\n-A INPUT -j APISERVER-PROXY-INPUTX\n-A INPUT -m comment --comment \"-j APISERVER-PROXY-INPUT\" -j ACCEPT\n", hookOut),
				call{argv: restoreNFT, stdin: "*filter\n-D INPUT -i eth0 -j APISERVER-PROXY-INPUT\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n"}),
			drifts: []string{
				`filter jump APISERVER-PROXY-INPUT: unexpected rule "-A INPUT -i eth0 -j APISERVER-PROXY-INPUT"`,
				"filter jump APISERVER-PROXY-INPUT: missing from INPUT",
			},
		},
		{
			name: "jump below a foreign rule is left where it is",
			calls: nftListing("iptables-nft", rawPre, rawOut, "-P PREROUTING ACCEPT\n-A PREROUTING -j CILIUM-PRE-raw\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n",
				hookRawOut, filterIn, filterOut, hookIn, hookOut),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := tc.calls
			if strings.Contains(calls[len(calls)-1].argv, "restore") {
				calls = append(calls[:len(calls):len(calls)], readBack()...)
			}
			r, stats := newRules(t, BackendNFT, rs, nil, calls...)
			drifts, err := r.Sync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.drifts, driftStrings(drifts)); diff != "" {
				t.Errorf("drifts (-want +got):\n%s", diff)
			}
			wantRestores := int64(0)
			if strings.Contains(tc.calls[len(tc.calls)-1].argv, "restore") {
				wantRestores = 1
			}
			if got := stats.Restores.Load(); got != wantRestores {
				t.Errorf("%d restores counted, want %d", got, wantRestores)
			}
		})
	}
}

func driftStrings(ds []Drift) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.String())
	}
	return out
}

func TestRulesSyncIPv6UsesIP6Tables(t *testing.T) {
	rs := ruleset(t, "fd00::2")
	calls := append(nftListing("ip6tables-nft", "", "", "-P PREROUTING ACCEPT\n", "-P OUTPUT ACCEPT\n", "", "", "-P INPUT ACCEPT\n", "-P OUTPUT ACCEPT\n"),
		call{argv: restoreNFTv6, stdin: string(rs.Payload())})
	v6 := func(listing string) string { return strings.ReplaceAll(listing, "10.96.0.2/32", "fd00::2/128") }
	calls = append(calls, nftListing("ip6tables-nft", v6(rawPre), v6(rawOut), hookPre, hookRawOut, v6(filterIn), v6(filterOut), hookIn, hookOut)...)
	r, _ := newRules(t, BackendNFT, rs, nil, calls...)
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestRulesSyncFailures(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	fresh := func() []call {
		return nftListing("iptables-nft", "", "", "-P PREROUTING ACCEPT\n", "-P OUTPUT ACCEPT\n", "", "", "-P INPUT ACCEPT\n", "-P OUTPUT ACCEPT\n")
	}
	for _, tc := range []struct {
		name       string
		calls      []call
		wantErr    string
		lockHeld   bool
		failures   int64
		restoreRun bool
	}{
		{
			name: "restore failure carries iptables' stderr",
			calls: append(fresh(), call{argv: restoreNFT, stdin: string(rs.Payload()), exit: 2,
				stderr: "iptables-restore v1.8.9 (nf_tables): unknown option \"--dport\"\nError occurred at line: 4\n"}),
			wantErr:  `iptables-nft-restore --noflush --wait=5: exit 2: iptables-restore v1.8.9 (nf_tables): unknown option "--dport" Error occurred at line: 4`,
			failures: 1,
		},
		{
			name: "held lock is reported as such",
			calls: append(fresh(), call{argv: restoreNFT, stdin: string(rs.Payload()), exit: 4,
				stderr: "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n"}),
			wantErr:  "Another app is currently holding the xtables lock",
			lockHeld: true,
			failures: 1,
		},
		{
			name: "failed read writes nothing",
			calls: []call{{argv: "iptables-nft -t raw -S APISERVER-PROXY-PREROUTING", exit: 4,
				stderr: "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n"}},
			wantErr: "Permission denied",
		},
		{
			name: "failed read of a built-in chain writes nothing",
			calls: []call{
				{argv: "iptables-nft -t raw -S APISERVER-PROXY-PREROUTING", stdout: rawPre},
				{argv: "iptables-nft -t raw -S APISERVER-PROXY-OUTPUT", stdout: rawOut},
				{argv: "iptables-nft -t raw -S PREROUTING", exit: 1, stderr: "iptables: No chain/target/match by that name.\n"},
			},
			wantErr: "No chain/target/match by that name",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, stats := newRules(t, BackendNFT, rs, nil, tc.calls...)
			_, err := r.Sync(context.Background())
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			var te *ToolError
			if !errors.As(err, &te) {
				t.Errorf("error %T is not a *ToolError", err)
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
		})
	}
}

// Legacy: one iptables-legacy-save per table, whose output holds everyone's
// rules; only ours are kept.
const (
	legacyRawSave = "# Generated by iptables-save v1.8.9 on Wed Nov 25 20:00:00 2026\n*raw\n" +
		":PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n:APISERVER-PROXY-PREROUTING - [0:0]\n:CILIUM-RAW - [0:0]\n" +
		"-A PREROUTING -j APISERVER-PROXY-PREROUTING\n-A PREROUTING -j CILIUM-RAW\n-A OUTPUT -j APISERVER-PROXY-OUTPUT\n" +
		"-A APISERVER-PROXY-OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK\n" +
		"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK\n" +
		"-A APISERVER-PROXY-PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK\n" +
		"-A CILIUM-RAW -j APISERVER-PROXY-OUTPUT\nCOMMIT\n# Completed on Wed Nov 25 20:00:00 2026\n"
	legacyFilterSave = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:APISERVER-PROXY-INPUT - [0:0]\n:KUBE-FIREWALL - [0:0]\n" +
		"-A INPUT -j KUBE-FIREWALL\n-A INPUT -j APISERVER-PROXY-INPUT\n-A KUBE-FIREWALL -d 10.96.0.2/32 -j APISERVER-PROXY-INPUT\n" +
		"-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT\nCOMMIT\n"
)

func TestRulesSyncLegacy(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	t.Run("converged raw, missing filter chain and jump: one save per table, one restore", func(t *testing.T) {
		// After its write, the first sync looks for ours in the nft backend.
		calls := append([]call{
			{argv: "iptables-legacy-save -t raw", stdout: legacyRawSave},
			{argv: "iptables-legacy-save -t filter", stdout: legacyFilterSave},
			{argv: "iptables-legacy-restore --noflush --wait=5", stdin: "*filter\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
				"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT\n-I OUTPUT -j APISERVER-PROXY-OUTPUT\nCOMMIT\n"},
		}, legacyConverged()...)
		calls = append(calls, noneOfOursNFT("iptables-nft")...)
		r, _ := newRules(t, BackendLegacy, rs, map[string]string{ipTablesNames: "mangle\nfilter\nraw\n"}, calls...)
		drifts, err := r.Sync(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"filter chain APISERVER-PROXY-OUTPUT: missing", "filter jump APISERVER-PROXY-OUTPUT: missing from OUTPUT"}
		if diff := cmp.Diff(want, driftStrings(drifts)); diff != "" {
			t.Errorf("drifts (-want +got):\n%s", diff)
		}
	})
	t.Run("fresh node: only the tables the kernel lists are read", func(t *testing.T) {
		tables := "raw\n" // the restore creates filter
		calls := append([]call{
			{argv: "iptables-legacy-save -t raw", stdout: "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"},
			{argv: "iptables-legacy-restore --noflush --wait=5", stdin: string(rs.Payload()),
				run: func() { tables = "raw\nfilter\n" }},
		}, legacyConverged()...)
		calls = append(calls, noneOfOursNFT("iptables-nft")...)
		r, _ := newRules(t, BackendLegacy, rs, nil, calls...)
		r.run.readFile = func(string) ([]byte, error) { return []byte(tables), nil }
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
}

func TestRulesCleanup(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	t.Run("removes our chains and every jump to them, nothing else", func(t *testing.T) {
		calls := append(nftListing("iptables-nft", rawPre, rawOut,
			"-P PREROUTING ACCEPT\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n-A PREROUTING -j KUBE-X\n-A PREROUTING -j APISERVER-PROXY-PREROUTING\n",
			hookRawOut, filterIn, "", hookIn, "-P OUTPUT ACCEPT\n"),
			call{argv: restoreNFT, stdin: "*raw\n:APISERVER-PROXY-PREROUTING - [0:0]\n:APISERVER-PROXY-OUTPUT - [0:0]\n" +
				"-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D PREROUTING -j APISERVER-PROXY-PREROUTING\n-D OUTPUT -j APISERVER-PROXY-OUTPUT\n" +
				"-X APISERVER-PROXY-PREROUTING\n-X APISERVER-PROXY-OUTPUT\nCOMMIT\n" +
				"*filter\n:APISERVER-PROXY-INPUT - [0:0]\n-D INPUT -j APISERVER-PROXY-INPUT\n-X APISERVER-PROXY-INPUT\nCOMMIT\n"})
		r, _ := newRules(t, BackendNFT, rs, nil, calls...)
		if _, err := r.Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("nothing of ours: no write", func(t *testing.T) {
		calls := nftListing("iptables-nft", "", "", "-P PREROUTING ACCEPT\n", "-P OUTPUT ACCEPT\n", "", "", "-P INPUT ACCEPT\n-A INPUT -j KUBE-FIREWALL\n", "-P OUTPUT ACCEPT\n")
		r, _ := newRules(t, BackendNFT, rs, nil, calls...)
		if _, err := r.Cleanup(context.Background()); err != nil {
			t.Fatal(err)
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
	gen := uint32(7)
	// 1: converged, generation recorded. 2: same generation, nothing run.
	// 3: generation moved, read again: a jump is gone, written, read back.
	// 4: the generation moved again (another writer); read, converged.
	// 5: skipped.
	calls := converged()
	calls = append(calls, nftListing("iptables-nft", rawPre, rawOut, hookPre, hookRawOut, filterIn, filterOut, "-P INPUT ACCEPT\n", hookOut)...)
	calls = append(calls, call{argv: restoreNFT, stdin: "*filter\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n"})
	calls = append(calls, readBack()...)
	calls = append(calls, converged()...)
	r, stats := newRules(t, BackendNFT, rs, nil, calls...)
	r.generation = func() (uint32, error) { return gen, nil }
	for i, g := range []uint32{7, 7, 8, 9, 9} {
		gen = g
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i+1, err)
		}
	}
	if got := stats.Skipped.Load(); got != 2 {
		t.Errorf("%d syncs skipped, want 2", got)
	}
}

func TestRulesReadWhenGenerationFails(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	r, stats := newRules(t, BackendNFT, rs, nil, append(converged(), converged()...)...)
	r.generation = func() (uint32, error) { return 0, errors.New("operation not permitted") }
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i+1, err)
		}
	}
	if stats.Skipped.Load() != 0 {
		t.Error("a sync was skipped without a generation")
	}
}

// fakeNFT is an nftReader over a fixed state, by "table/chain": the chains
// that exist, the jumps in each built-in chain, and the expressions of
// rules in our chains.
type fakeNFT struct {
	chains map[string]bool
	rules  map[string][]nfnl.Rule
	stored map[string][][]string
}

func (f fakeNFT) hasChain(_ render.Family, table, chain string) (bool, error) {
	return f.chains[table+"/"+chain], nil
}

// exprs answers from stored, or for an existing chain not in stored as if
// its rule were stored in a form this reader does not know: such a chain
// is then listed as text.
func (f fakeNFT) exprs(_ render.Family, table, chain string) ([][]string, error) {
	if e, ok := f.stored[table+"/"+chain]; ok {
		return e, nil
	}
	if f.chains[table+"/"+chain] {
		return [][]string{{"unknown"}}, nil
	}
	return nil, nil
}

func (f fakeNFT) jumps(_ render.Family, table, chain string) ([]nfnl.Rule, int, error) {
	j := f.rules[table+"/"+chain]
	return j, len(j), nil
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

func TestRulesSyncNFTReadsInProcess(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	jump := func(target string) nfnl.Rule { return nfnl.Rule{Verdict: "jump", Target: target, Bare: true} }
	allChains := map[string]bool{
		"raw/APISERVER-PROXY-PREROUTING": true, "raw/APISERVER-PROXY-OUTPUT": true,
		"filter/APISERVER-PROXY-INPUT": true, "filter/APISERVER-PROXY-OUTPUT": true,
	}
	allJumps := map[string][]nfnl.Rule{
		"raw/PREROUTING": {jump("APISERVER-PROXY-PREROUTING"), {Verdict: "jump", Target: "CILIUM-PRE-raw"}},
		"raw/OUTPUT":     {jump("APISERVER-PROXY-OUTPUT")},
		"filter/INPUT":   {{Verdict: "jump", Target: "KUBE-FIREWALL", Bare: true}, jump("APISERVER-PROXY-INPUT")},
		"filter/OUTPUT":  {jump("APISERVER-PROXY-OUTPUT")},
	}
	list := func(table, chain, out string) call {
		return call{argv: "iptables-nft -t " + table + " -S " + chain, stdout: out}
	}
	ourListings := []call{
		list("raw", "APISERVER-PROXY-PREROUTING", rawPre),
		list("raw", "APISERVER-PROXY-OUTPUT", rawOut),
		list("filter", "APISERVER-PROXY-INPUT", filterIn),
		list("filter", "APISERVER-PROXY-OUTPUT", filterOut),
	}
	for _, tc := range []struct {
		name   string
		nft    fakeNFT
		calls  []call
		drifts []string
	}{
		{
			name:  "converged: our four chains are listed, the built-in chains are not",
			nft:   fakeNFT{chains: allChains, rules: allJumps},
			calls: ourListings,
		},
		{
			name:  "converged and stored as iptables-nft stores our rules: nothing runs",
			nft:   fakeNFT{chains: allChains, rules: allJumps, stored: storedAsRendered(t, rs)},
			calls: nil,
		},
		{
			name: "a flushed chain is rewritten without any listing",
			nft: fakeNFT{chains: allChains, rules: allJumps, stored: func() map[string][][]string {
				s := storedAsRendered(t, rs)
				s["filter/APISERVER-PROXY-INPUT"] = nil
				return s
			}()},
			calls: []call{{argv: restoreNFT, stdin: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n" +
				"-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT\nCOMMIT\n"}},
			drifts: []string{"filter chain APISERVER-PROXY-INPUT: rules differ (0 listed, 1 rendered)"},
		},
		{
			name:   "fresh node: nothing is listed, the payload is loaded",
			nft:    fakeNFT{},
			calls:  []call{{argv: restoreNFT, stdin: string(rs.Payload())}},
			drifts: freshDrifts,
		},
		{
			name: "duplicated bare jump is repaired without listing the built-in chain",
			nft: fakeNFT{chains: allChains, rules: map[string][]nfnl.Rule{
				"raw/PREROUTING": allJumps["raw/PREROUTING"], "raw/OUTPUT": allJumps["raw/OUTPUT"],
				"filter/INPUT":  {jump("APISERVER-PROXY-INPUT"), jump("APISERVER-PROXY-INPUT")},
				"filter/OUTPUT": allJumps["filter/OUTPUT"],
			}},
			calls: append(ourListings[:4:4], call{argv: restoreNFT,
				stdin: "*filter\n-D INPUT -j APISERVER-PROXY-INPUT\n-D INPUT -j APISERVER-PROXY-INPUT\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n"}),
			drifts: []string{"filter jump APISERVER-PROXY-INPUT: 2 copies in INPUT"},
		},
		{
			name: "a jump of another form is listed as text, to be deleted as printed",
			nft: fakeNFT{chains: allChains, rules: map[string][]nfnl.Rule{
				"raw/PREROUTING": allJumps["raw/PREROUTING"], "raw/OUTPUT": allJumps["raw/OUTPUT"],
				"filter/INPUT":  allJumps["filter/INPUT"],
				"filter/OUTPUT": {{Verdict: "goto", Target: "APISERVER-PROXY-OUTPUT"}},
			}},
			calls: append(ourListings[:4:4],
				list("filter", "OUTPUT", "-P OUTPUT ACCEPT\n-A OUTPUT -g APISERVER-PROXY-OUTPUT\n"),
				call{argv: restoreNFT, stdin: "*filter\n-D OUTPUT -g APISERVER-PROXY-OUTPUT\n-I OUTPUT -j APISERVER-PROXY-OUTPUT\nCOMMIT\n"}),
			drifts: []string{
				`filter jump APISERVER-PROXY-OUTPUT: unexpected rule "-A OUTPUT -g APISERVER-PROXY-OUTPUT"`,
				"filter jump APISERVER-PROXY-OUTPUT: missing from OUTPUT",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r *Rules
			calls := slices.Clone(tc.calls)
			if n := len(calls); n > 0 && strings.Contains(calls[n-1].argv, "restore") {
				// The write puts everything in place, as the read-back
				// after it then finds, in-process.
				calls[n-1].run = func() {
					r.run.nft = fakeNFT{chains: allChains, rules: allJumps, stored: storedAsRendered(t, rs)}
				}
			}
			r, _ = newRules(t, BackendNFT, rs, nil, calls...)
			r.run.nft = tc.nft
			drifts, err := r.Sync(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.drifts, driftStrings(drifts)); diff != "" {
				t.Errorf("drifts (-want +got):\n%s", diff)
			}
		})
	}
}

// A restore that exits 0 without loading anything must not pass for a
// repair: the read-back after it finds the same drift and fails the sync,
// and nothing is written a second time.
func TestRulesReadBackCatchesARestoreThatLoadedNothing(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	calls := append(noneOfOursNFT("iptables-nft"), call{argv: restoreNFT, stdin: string(rs.Payload())})
	calls = append(calls, noneOfOursNFT("iptables-nft")...)
	r, stats := newRules(t, BackendNFT, rs, nil, calls...)
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
