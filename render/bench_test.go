package render_test

import (
	"net/netip"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// BenchmarkRender measures rendering the ruleset: once at start for each
// address family, so its cost is paid once per process.
func BenchmarkRender(b *testing.B) {
	for _, tc := range []struct {
		name  string
		addrs []netip.Addr
	}{
		{"ipv4", []netip.Addr{netip.MustParseAddr("10.96.0.2")}},
		{"dual-stack", []netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("fd00::2")}},
		{"dual-stack-clusterip", []netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00:10:96::1")}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rs, err := render.Render(tc.addrs, 443)
				if err != nil {
					b.Fatal(err)
				}
				if want := min(len(tc.addrs), 2); len(rs) != want {
					b.Fatalf("got %d rulesets, want %d", len(rs), want)
				}
			}
		})
	}
}
