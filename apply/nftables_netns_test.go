package apply

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// TestNFTReaderNetns checks what the in-process reader tells of chains and
// jumps that iptables-nft wrote, against the real kernel.
func TestNFTReaderNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "ip6tables-nft")
	for _, tc := range []struct {
		family render.Family
		bin    string
	}{{render.IPv4, "iptables-nft"}, {render.IPv6, "ip6tables-nft"}} {
		t.Run(tc.bin, func(t *testing.T) {
			ns := netnstest.New(t)
			n := nftables{ns: ns.NetNS(t)}

			// Nothing exists yet: not even the table.
			if ok, err := n.hasChain(tc.family, "filter", "OURS"); ok || err != nil {
				t.Fatalf("hasChain in a namespace without tables = %v, %v; want false, nil", ok, err)
			}
			if j, total, err := n.jumps(tc.family, "filter", "INPUT"); j != nil || total != 0 || err != nil {
				t.Fatalf("jumps in a namespace without tables = %v, %d, %v; want none", j, total, err)
			}

			ipt := func(args ...string) { ns.Run(t, tc.bin, args...) }
			ipt("-t", "filter", "-N", "OURS")
			ipt("-t", "filter", "-N", "OTHER")
			ipt("-t", "filter", "-A", "INPUT", "-p", "tcp", "-j", "ACCEPT")
			ipt("-t", "filter", "-A", "INPUT", "-j", "OURS")
			ipt("-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "OURS")
			ipt("-t", "filter", "-A", "INPUT", "-g", "OTHER")
			ipt("-t", "filter", "-A", "INPUT", "-m", "comment", "--comment", "x", "-j", "OURS")

			for _, c := range []struct {
				table, chain string
				want         bool
			}{
				{"filter", "OURS", true},
				{"filter", "INPUT", true},
				{"filter", "MISSING", false},
				{"raw", "OURS", false},
			} {
				if ok, err := n.hasChain(tc.family, c.table, c.chain); ok != c.want || err != nil {
					t.Errorf("hasChain(%s, %s) = %v, %v; want %v, nil", c.table, c.chain, ok, err, c.want)
				}
			}
			jumps, total, err := n.jumps(tc.family, "filter", "INPUT")
			if err != nil {
				t.Fatal(err)
			}
			want := []nftRule{
				{Verdict: "jump", Target: "OURS", Bare: true},
				{Verdict: "jump", Target: "OURS"},
				{Verdict: "goto", Target: "OTHER"},
				{Verdict: "jump", Target: "OURS"},
			}
			if diff := cmp.Diff(want, jumps); diff != "" || total != 5 {
				t.Errorf("jumps from INPUT (total %d, want 5) (-want +got):\n%s\nlisting:\n%s", total, diff, ns.Run(t, tc.bin, "-t", "filter", "-S", "INPUT"))
			}
			// The other family's tables are not this one's.
			other := render.IPv6
			if tc.family == render.IPv6 {
				other = render.IPv4
			}
			if ok, err := n.hasChain(other, "filter", "OURS"); ok || err != nil {
				t.Errorf("hasChain in the other family = %v, %v; want false, nil", ok, err)
			}
		})
	}
}

// TestWantExprsMatchIPTablesNFT loads the rendered ruleset with the real
// iptables-nft-restore and checks that the in-process reader finds exactly
// the expressions wantExprs expects, and a difference when a rule differs.
func TestWantExprsMatchIPTablesNFT(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft-restore", "ip6tables-nft-restore")
	for _, addr := range []string{"10.96.0.2", "fd00::2"} {
		rs := ruleset(t, addr)
		bin := BackendNFT.binary(rs.Family, toolIPTables)
		t.Run(bin, func(t *testing.T) {
			ns := netnstest.New(t)
			cmd := ns.Command(BackendNFT.binary(rs.Family, toolRestore), "--noflush")
			cmd.Stdin = bytes.NewReader(rs.Payload())
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("loading the payload: %v: %s", err, out)
			}
			n := nftables{ns: ns.NetNS(t)}
			want := storedAsRendered(t, rs)
			for _, tb := range rs.Tables {
				for _, c := range tb.Chains {
					got, err := n.exprs(rs.Family, tb.Name, c.Name)
					if err != nil {
						t.Fatal(err)
					}
					if diff := cmp.Diff(want[tb.Name+"/"+c.Name], got); diff != "" {
						t.Errorf("%s %s: expressions (-want +got):\n%s", tb.Name, c.Name, diff)
					}
				}
			}
			// The same rule with another port, and with the other spelling
			// of NOTRACK, must not match.
			raw := rs.Tables[0]
			out := raw.Chains[1]
			for _, spec := range [][]string{
				{"-d", rulePrefix(t, out.Rules[0]), "-p", "tcp", "-m", "tcp", "--dport", "444", "-j", "NOTRACK"},
				{"-d", rulePrefix(t, out.Rules[0]), "-p", "tcp", "-m", "tcp", "--dport", "443", "-j", "CT", "--notrack"},
			} {
				ns.Run(t, bin, append([]string{"-t", "raw", "-R", out.Name, "1"}, spec...)...)
				got, err := n.exprs(rs.Family, "raw", out.Name)
				if err != nil {
					t.Fatal(err)
				}
				want, _ := wantExprs(rs.Family, out.Rules[0])
				if len(got) == 0 || slices.Equal(got[0], want) {
					t.Errorf("after -R %v the rule still reads as ours: %v", spec, got)
				}
			}
		})
	}
}

// rulePrefix returns the address prefix of one of our rendered rules.
func rulePrefix(t *testing.T, rule string) string {
	t.Helper()
	w := strings.Fields(rule)
	if len(w) < 4 {
		t.Fatalf("unexpected rule %q", rule)
	}
	return w[3]
}
