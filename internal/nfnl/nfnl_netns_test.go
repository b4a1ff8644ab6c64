package nfnl

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestNFTReaderNetns checks what the in-process reader tells of chains and
// jumps that iptables-nft wrote, against the real kernel.
func TestNFTReaderNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "ip6tables-nft")
	for _, tc := range []struct {
		family Proto
		bin    string
	}{{IPv4, "iptables-nft"}, {IPv6, "ip6tables-nft"}} {
		t.Run(tc.bin, func(t *testing.T) {
			ns := netnstest.New(t)
			n := Conn{NS: ns.NetNS(t)}

			// Nothing exists yet: not even the table.
			if ok, err := n.HasChain(tc.family, "filter", "OURS"); ok || err != nil {
				t.Fatalf("hasChain in a namespace without tables = %v, %v; want false, nil", ok, err)
			}
			if j, total, err := n.Jumps(tc.family, "filter", "INPUT"); j != nil || total != 0 || err != nil {
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
				if ok, err := n.HasChain(tc.family, c.table, c.chain); ok != c.want || err != nil {
					t.Errorf("hasChain(%s, %s) = %v, %v; want %v, nil", c.table, c.chain, ok, err, c.want)
				}
			}
			jumps, total, err := n.Jumps(tc.family, "filter", "INPUT")
			if err != nil {
				t.Fatal(err)
			}
			want := []Rule{
				{Verdict: "jump", Target: "OURS", Bare: true},
				{Verdict: "jump", Target: "OURS"},
				{Verdict: "goto", Target: "OTHER"},
				{Verdict: "jump", Target: "OURS"},
			}
			if diff := cmp.Diff(want, jumps); diff != "" || total != 5 {
				t.Errorf("jumps from INPUT (total %d, want 5) (-want +got):\n%s\nlisting:\n%s", total, diff, ns.Run(t, tc.bin, "-t", "filter", "-S", "INPUT"))
			}
			// The other family's tables are not this one's.
			other := IPv6
			if tc.family == IPv6 {
				other = IPv4
			}
			if ok, err := n.HasChain(other, "filter", "OURS"); ok || err != nil {
				t.Errorf("hasChain in the other family = %v, %v; want false, nil", ok, err)
			}
		})
	}
}

// TestGenerationNetns checks that a listing leaves the generation as it
// is and a write changes it.
func TestGenerationNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft")
	ns := netnstest.New(t)
	h := ns.NetNS(t)
	g0, err := (Conn{NS: h}).Generation()
	if err != nil {
		t.Fatal(err)
	}
	ns.Run(t, "iptables-nft", "-t", "filter", "-S", "INPUT")
	if g, err := (Conn{NS: h}).Generation(); err != nil || g != g0 {
		t.Fatalf("after a listing: generation %d (error %v), want %d unchanged", g, err, g0)
	}
	ns.Run(t, "iptables-nft", "-A", "INPUT", "-j", "ACCEPT")
	g1, err := (Conn{NS: h}).Generation()
	if err != nil {
		t.Fatal(err)
	}
	if g1 == g0 {
		t.Fatalf("generation %d unchanged after a write", g1)
	}
}
