package render_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/config"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// FuzzValidateRender feeds arbitrary flag values through validation and
// rendering. Whatever the input, the result is either a validation error or
// exactly the expected ruleset for the validated address and port: no input
// can add, drop or alter a line.
func FuzzValidateRender(f *testing.F) {
	for _, seed := range []struct{ addr, port, iface string }{
		{"10.96.0.2", "443", "lo"},
		{"fd00::2", "8443", "dummy0"},
		{"10.96.0.2,fd00::2", "1", "lo"},
		{"10.96.0.2,100.64.0.1", "443", "apiserver-proxy"},
		{"fd00::2,10.96.0.2,fd00:10:96::1,100.64.0.1", "443", "lo"},
		{"10.96.0.2,10.96.0.2", "443", "lo"},
		{"10.96.0.2,,fd00::2", "443", "lo"},
		{"10.96.0.2\n-A INPUT -j DROP", "443", "lo"},
		{"10.96.0.2", "443 -j DROP", "lo"},
		{"fe80::1%eth0", "443", "lo"},
		{"::ffff:1.2.3.4", "65535", "eth0:1"},
	} {
		f.Add(seed.addr, seed.port, seed.iface)
	}
	f.Fuzz(func(t *testing.T, addr, port, iface string) {
		cfg, err := config.Flags{IPAddress: addr, Port: port, Interface: iface, SyncInterval: time.Minute, Backend: "nft"}.Validate()
		if err != nil {
			return
		}
		rulesets, err := render.Render(cfg.Addrs, cfg.Port)
		if err != nil {
			t.Fatalf("validated input %q port %q was refused by render: %v", addr, port, err)
		}
		// cfg.Addrs holds the IPv4 addresses first: one ruleset per
		// family, each with that family's addresses in order.
		var families [][]netip.Addr
		for i, a := range cfg.Addrs {
			if i == 0 || a.Is4() != cfg.Addrs[i-1].Is4() {
				families = append(families, nil)
			}
			families[len(families)-1] = append(families[len(families)-1], a)
		}
		if len(rulesets) != len(families) {
			t.Fatalf("%d rulesets for %d families of %v", len(rulesets), len(families), cfg.Addrs)
		}
		for i, rs := range rulesets {
			checkRuleset(t, rs, families[i], cfg.Port)
		}
		// The printed text is the payloads and one comment line per family.
		var want strings.Builder
		for i, rs := range rulesets {
			want.WriteString("# " + rs.Family.String() + ": ")
			if rs.Family == render.IPv6 {
				want.WriteString("ip6tables-restore --noflush\n")
			} else {
				want.WriteString("iptables-restore --noflush\n")
			}
			want.WriteString(wantPayload(wantTables(families[i], cfg.Port)))
		}
		if got := string(render.Format(rulesets)); got != want.String() {
			t.Fatalf("Format for %q port %q:\n%s\nwant:\n%s", addr, port, got, want.String())
		}
	})
}
