package render_test

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

var update = flag.Bool("update", false, "rewrite the golden files in ../golden with the current output")

// goldenCases are the rulesets pinned in ../golden. Each file holds exactly
// what --dry-run prints for the case.
var goldenCases = []struct {
	file  string
	addrs []string
	port  uint16
}{
	{"ipv4-default.rules", []string{"10.96.0.2"}, 443},
	{"ipv4-port-8443.rules", []string{"10.96.0.2"}, 8443},
	{"ipv6.rules", []string{"fd00::2"}, 443},
	{"dual-stack.rules", []string{"10.96.0.2", "fd00::2"}, 443},
	// The proxy address and the kubernetes Service ClusterIP it intercepts.
	{"ipv4-clusterip.rules", []string{"10.96.0.2", "100.64.0.1"}, 443},
	// Dual-stack, with a ClusterIP per family.
	{"dual-stack-clusterip.rules", []string{"10.96.0.2", "100.64.0.1", "fd00::2", "fd00:10:96::1"}, 443},
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.file, func(t *testing.T) {
			rulesets, err := render.Render(mustAddrs(t, tc.addrs...), tc.port)
			if err != nil {
				t.Fatal(err)
			}
			got := render.Format(rulesets)
			path := filepath.Join("..", "golden", tc.file)
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (create it with: go test ./render -update)", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("%s differs from the rendered ruleset (-want +got):\n%s\nIf the change is intended, regenerate with: go test ./render -update", path, diff)
			}
		})
	}
}

// wantTables is the ruleset written out by hand, independently of the
// template and of the golden files, so neither can drift unnoticed: the
// five rules of the original sidecar for each address, address after
// address within each chain.
func wantTables(addrs []netip.Addr, port uint16) []render.Table {
	rules := func(chain string, dirs ...string) []string {
		var out []string
		for _, addr := range addrs {
			p := netip.PrefixFrom(addr, addr.BitLen())
			for _, d := range dirs {
				dir, target, _ := strings.Cut(d, " ")
				flag := map[string]string{"d": "dport", "s": "sport"}[dir]
				out = append(out, fmt.Sprintf("-A %s -%s %s -p tcp -m tcp --%s %d -j %s", chain, dir, p, flag, port, target))
			}
		}
		return out
	}
	return []render.Table{
		{Name: "raw", Chains: []render.Chain{
			{Name: "APISERVER-PROXY-PREROUTING", Hook: "PREROUTING", Rules: rules("APISERVER-PROXY-PREROUTING", "d NOTRACK")},
			{Name: "APISERVER-PROXY-OUTPUT", Hook: "OUTPUT", Rules: rules("APISERVER-PROXY-OUTPUT", "d NOTRACK", "s NOTRACK")},
		}},
		{Name: "filter", Chains: []render.Chain{
			{Name: "APISERVER-PROXY-INPUT", Hook: "INPUT", Rules: rules("APISERVER-PROXY-INPUT", "d ACCEPT")},
			{Name: "APISERVER-PROXY-OUTPUT", Hook: "OUTPUT", Rules: rules("APISERVER-PROXY-OUTPUT", "s ACCEPT")},
		}},
	}
}

// wantPayload is the restore input for wantTables: per table the chain
// declarations, the rules, the jumps, COMMIT.
func wantPayload(tables []render.Table) string {
	var b strings.Builder
	for _, t := range tables {
		fmt.Fprintf(&b, "*%s\n", t.Name)
		for _, c := range t.Chains {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c.Name)
		}
		for _, c := range t.Chains {
			for _, r := range c.Rules {
				b.WriteString(r + "\n")
			}
		}
		for _, c := range t.Chains {
			fmt.Fprintf(&b, "-I %s -j %s\n", c.Hook, c.Name)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// checkRuleset asserts the whole structure of rs: five rules per address
// in the right tables and chains, four jumps, nothing else, in canonical
// form.
func checkRuleset(t *testing.T, rs *render.Ruleset, addrs []netip.Addr, port uint16) {
	t.Helper()
	if want := render.FamilyOf(addrs[0]); rs.Family != want {
		t.Errorf("family = %v, want %v", rs.Family, want)
	}
	if diff := cmp.Diff(addrs, rs.Addrs, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("addresses (-want +got):\n%s", diff)
	}
	want := wantTables(addrs, port)
	if diff := cmp.Diff(want, rs.Tables); diff != "" {
		t.Errorf("tables (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(wantPayload(want), string(rs.Payload())); diff != "" {
		t.Errorf("payload (-want +got):\n%s", diff)
	}
	rules := 0
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			rules += len(c.Rules)
		}
	}
	if rules != 5*len(addrs) {
		t.Errorf("%d rules, want %d", rules, 5*len(addrs))
	}
}

func TestRenderStructure(t *testing.T) {
	for _, tc := range []struct {
		addrs []string
		port  uint16
	}{
		{[]string{"10.96.0.2"}, 443},
		{[]string{"10.96.0.2"}, 8443},
		{[]string{"192.168.255.254"}, 1},
		{[]string{"fd00::2"}, 443},
		{[]string{"2001:db8::a:0:0:1"}, 65535},
		{[]string{"10.96.0.2", "100.64.0.1"}, 443},
		{[]string{"100.64.0.1", "10.96.0.2"}, 443}, // the order given
		{[]string{"fd00::2", "fd00:10:96::1", "2001:db8::1"}, 6443},
		{[]string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8"}, 443},
	} {
		t.Run(fmt.Sprintf("%s:%d", strings.Join(tc.addrs, ","), tc.port), func(t *testing.T) {
			addrs := mustAddrs(t, tc.addrs...)
			rs, err := render.RenderFamily(addrs, tc.port)
			if err != nil {
				t.Fatal(err)
			}
			checkRuleset(t, rs, addrs, tc.port)
		})
	}
}

// TestCanonicalForm pins the exact text iptables prints back with -S for
// these rules (verified against iptables 1.8.9, both backends), which is
// what the apply package compares against.
func TestCanonicalForm(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want []string
	}{
		{"10.96.0.2", []string{
			"-A APISERVER-PROXY-PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK",
			"-A APISERVER-PROXY-OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j NOTRACK",
			"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j NOTRACK",
			"-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 443 -j ACCEPT",
			"-A APISERVER-PROXY-OUTPUT -s 10.96.0.2/32 -p tcp -m tcp --sport 443 -j ACCEPT",
		}},
		{"FD00:0:0::2", []string{
			"-A APISERVER-PROXY-PREROUTING -d fd00::2/128 -p tcp -m tcp --dport 443 -j NOTRACK",
			"-A APISERVER-PROXY-OUTPUT -d fd00::2/128 -p tcp -m tcp --dport 443 -j NOTRACK",
			"-A APISERVER-PROXY-OUTPUT -s fd00::2/128 -p tcp -m tcp --sport 443 -j NOTRACK",
			"-A APISERVER-PROXY-INPUT -d fd00::2/128 -p tcp -m tcp --dport 443 -j ACCEPT",
			"-A APISERVER-PROXY-OUTPUT -s fd00::2/128 -p tcp -m tcp --sport 443 -j ACCEPT",
		}},
	} {
		rs, err := render.RenderFamily([]netip.Addr{netip.MustParseAddr(tc.addr)}, 443)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, tb := range rs.Tables {
			for _, c := range tb.Chains {
				got = append(got, c.Rules...)
			}
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.addr, diff)
		}
	}
}

// TestJumps proves one jump per chain, however many addresses.
func TestJumps(t *testing.T) {
	rs, err := render.RenderFamily(mustAddrs(t, "10.96.0.2", "100.64.0.1"), 443)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			got = append(got, tb.Name+": "+c.JumpRule())
		}
	}
	want := []string{
		"raw: -A PREROUTING -j APISERVER-PROXY-PREROUTING",
		"raw: -A OUTPUT -j APISERVER-PROXY-OUTPUT",
		"filter: -A INPUT -j APISERVER-PROXY-INPUT",
		"filter: -A OUTPUT -j APISERVER-PROXY-OUTPUT",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("jumps (-want +got):\n%s", diff)
	}
}

func TestRenderRefuses(t *testing.T) {
	v4, v6 := netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("fd00::2")
	for name, tc := range map[string]struct {
		addrs []netip.Addr
		port  uint16
	}{
		"no address":       {nil, 443},
		"zero address":     {[]netip.Addr{{}}, 443},
		"nine addresses":   {mustAddrs(t, "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8", "fd00::2"), 443},
		"IPv4 twice":       {[]netip.Addr{v4, v6, v4}, 443},
		"IPv6 twice":       {[]netip.Addr{v6, netip.MustParseAddr("fd00:0::2")}, 443},
		"zone":             {[]netip.Addr{netip.MustParseAddr("fe80::1%eth0")}, 443},
		"unspecified IPv4": {[]netip.Addr{netip.IPv4Unspecified()}, 443},
		"unspecified IPv6": {[]netip.Addr{netip.IPv6Unspecified()}, 443},
		"IPv4-mapped IPv6": {[]netip.Addr{netip.MustParseAddr("::ffff:10.96.0.2")}, 443},
		"port 0":           {[]netip.Addr{v4}, 0},
	} {
		if rs, err := render.Render(tc.addrs, tc.port); err == nil {
			t.Errorf("%s: Render succeeded, want an error; got:\n%s", name, render.Format(rs))
		}
	}
	if rs, err := render.RenderFamily([]netip.Addr{v4, v6}, 443); err == nil {
		t.Errorf("RenderFamily of two families succeeded, want an error; got:\n%s", rs.Payload())
	}
}

// TestRenderGroupsFamilies proves that a mixed list becomes one ruleset per
// family, IPv4 first, each with its addresses in the order given.
func TestRenderGroupsFamilies(t *testing.T) {
	rulesets, err := render.Render(mustAddrs(t, "fd00::2", "100.64.0.1", "fd00:10:96::1", "10.96.0.2"), 443)
	if err != nil {
		t.Fatal(err)
	}
	if len(rulesets) != 2 {
		t.Fatalf("%d rulesets, want 2", len(rulesets))
	}
	checkRuleset(t, rulesets[0], mustAddrs(t, "100.64.0.1", "10.96.0.2"), 443)
	checkRuleset(t, rulesets[1], mustAddrs(t, "fd00::2", "fd00:10:96::1"), 443)
}

func mustAddrs(t *testing.T, ss ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// TestChains proves that the teardown ruleset has the chains and jumps of
// every ruleset and no rule.
func TestChains(t *testing.T) {
	for _, f := range []render.Family{render.IPv4, render.IPv6} {
		rs, err := render.Chains(f)
		if err != nil {
			t.Fatal(err)
		}
		full, err := render.Render(mustAddrs(t, map[render.Family]string{render.IPv4: "10.96.0.2", render.IPv6: "fd00::2"}[f]), 443)
		if err != nil {
			t.Fatal(err)
		}
		want := full[0].Tables
		for i := range want {
			for j := range want[i].Chains {
				want[i].Chains[j].Rules = nil
			}
		}
		if rs.Family != f {
			t.Errorf("family %v, want %v", rs.Family, f)
		}
		if diff := cmp.Diff(want, rs.Tables); diff != "" {
			t.Errorf("%v tables (-want +got):\n%s", f, diff)
		}
	}
}
