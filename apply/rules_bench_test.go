package apply

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// benchListing returns the lines `iptables -S` prints for our chains and the
// built-in chains that jump to them in table t, in the order the sidecar
// reads them: our chains, then the hooks, each hook with a few foreign
// rules around our jump.
func benchListing(t render.Table) []string {
	var lines []string
	for _, c := range t.Chains {
		lines = append(lines, "-N "+c.Name)
		lines = append(lines, c.Rules...)
	}
	for _, h := range hooks(t) {
		lines = append(lines, "-P "+h+" ACCEPT", "-A "+h+` -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`)
		for _, c := range t.Chains {
			if c.Hook == h {
				lines = append(lines, c.JumpRule())
			}
		}
		lines = append(lines, "-A "+h+" -j CNI-"+h)
	}
	return lines
}

// BenchmarkRepair measures what a sync does with what it read: collect the
// listing of a table and compare it with the rendered table. Converged, it
// writes nothing; drifted (one chain flushed, one jump missing), it returns
// the restore lines that repair the table.
func BenchmarkRepair(b *testing.B) {
	rs, err := render.RenderFamily([]netip.Addr{netip.MustParseAddr("10.96.0.2")}, 443)
	if err != nil {
		b.Fatal(err)
	}
	filter := rs.Tables[len(rs.Tables)-1]
	converged := benchListing(filter)
	drifted := slices.DeleteFunc(slices.Clone(converged), func(l string) bool {
		return strings.HasPrefix(l, "-A "+filter.Chains[0].Name+" ") || l == filter.Chains[1].JumpRule()
	})
	for _, tc := range []struct {
		name      string
		lines     []string
		wantLines bool
	}{
		{"converged", converged, false},
		{"drifted", drifted, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				st := tableState{chains: map[string][]string{}, refs: map[string][]string{}}
				_, collect := st.collector(filter)
				for _, l := range tc.lines {
					collect(l)
				}
				lines, _ := repair(filter, st)
				if (len(lines) > 0) != tc.wantLines {
					b.Fatalf("repair returned %d lines, want lines: %v", len(lines), tc.wantLines)
				}
			}
		})
	}
}
