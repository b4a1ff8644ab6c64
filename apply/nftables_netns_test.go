package apply

import (
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
)

// TestWantExprsMatchIPTablesNFT loads the rendered ruleset with the real
// iptables-nft-restore and checks that the in-process reader finds exactly
// the expressions wantExprs expects, and a difference when a rule differs.
func TestWantExprsMatchIPTablesNFT(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft-restore", "ip6tables-nft-restore")
	for _, addr := range []string{"10.96.0.2", "fd00::2"} {
		rs := ruleset(t, addr)
		bin := program(BackendNFT, rs.Family, backend.IPTables)
		t.Run(bin, func(t *testing.T) {
			ns := netnstest.New(t)
			cmd := ns.Command(program(BackendNFT, rs.Family, backend.Restore), "--noflush")
			cmd.Stdin = bytes.NewReader(rs.Payload())
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("loading the payload: %v: %s", err, out)
			}
			n := hostNode{nft: nfnl.Conn{NS: ns.NetNS(t)}}
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
