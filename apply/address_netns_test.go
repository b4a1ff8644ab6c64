package apply

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// foreignAddrs are set up in every namespace before the Address exists; no
// step may change them.
var foreignAddrs = []struct{ dev, cidr string }{
	{"lo", "192.0.2.7/32"},
	{"lo", "2001:db8::7/128"},
	{"other0", "198.51.100.1/24"},
	{"other0", "2001:db8:1::1/64"},
}

// addForeignLink adds a link that the Address did not create. It prefers a dummy
// link, falling back to kinds that every test kernel seems to have.
func addForeignLink(t *testing.T, ns *netnstest.NS, name string) {
	t.Helper()
	var errs []string
	for _, kind := range []string{"dummy", "ifb", "bridge"} {
		_, err := ns.RunErr("ip", "link", "add", name, "type", kind)
		if err == nil {
			ns.Run(t, "ip", "link", "set", name, "up")
			return
		}
		errs = append(errs, err.Error())
	}
	t.Fatalf("cannot add link %s: %s", name, strings.Join(errs, "; "))
}

func addIPAddr(t *testing.T, ns *netnstest.NS, dev, cidr string) {
	t.Helper()
	args := []string{"addr", "add", cidr, "dev", dev}
	if strings.Contains(cidr, ":") {
		args = append(args, "nodad")
	}
	ns.Run(t, "ip", args...)
}

// foreignLines returns the `ip -o addr show` lines of the foreign addresses,
// except those in skip.
func foreignLines(t *testing.T, ns *netnstest.NS, skip []string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(ns.Run(t, "ip", "-o", "addr", "show"), "\n") {
		for _, f := range foreignAddrs {
			if strings.Contains(line, " "+f.cidr+" ") && !slices.Contains(skip, f.cidr) {
				out = append(out, line)
			}
		}
	}
	return out
}

// managedLines returns the `ip -o addr show` lines of the managed addresses.
func managedLines(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(ns.Run(t, "ip", "-o", "addr", "show"), "\n") {
		if strings.Contains(line, " 10.96.0.2/") || strings.Contains(line, " fd00::2/") {
			out = append(out, line)
		}
	}
	return out
}

// wantManagedOn fails unless both managed addresses are on dev, exactly once
// each, as host prefixes with global scope, and nowhere else.
func wantManagedOn(t *testing.T, ns *netnstest.NS, dev string) {
	t.Helper()
	got := managedLines(t, ns)
	want := []string{"inet 10.96.0.2/32 scope global", "inet6 fd00::2/128 scope global nodad"}
	if len(got) != len(want) {
		t.Fatalf("managed addresses in %s:\n%s\nwant exactly %q on %s", ns.Name, strings.Join(got, "\n"), want, dev)
	}
	for _, w := range want {
		found := false
		for _, line := range got {
			fields := strings.Fields(line)
			if len(fields) > 1 && fields[1] == dev && strings.Contains(line, w) {
				found = true
			}
		}
		if !found {
			t.Errorf("%q missing on %s in %s:\n%s", w, dev, ns.Name, strings.Join(got, "\n"))
		}
	}
}

func wantNoManaged(t *testing.T, ns *netnstest.NS) {
	t.Helper()
	if got := managedLines(t, ns); len(got) != 0 {
		t.Errorf("managed addresses left in %s:\n%s", ns.Name, strings.Join(got, "\n"))
	}
}

func wantEnsure(t *testing.T, a *Address, want ...string) {
	t.Helper()
	repairs, err := a.Ensure()
	if err != nil {
		t.Fatalf("Ensure() error: %v", err)
	}
	if diff := cmp.Diff(want, repairStrings(repairs)); diff != "" {
		t.Errorf("Ensure() repairs (-want +got):\n%s", diff)
	}
}

func wantCleanup(t *testing.T, a *Address) {
	t.Helper()
	if _, err := a.Cleanup(); err != nil {
		t.Fatalf("Cleanup() error: %v", err)
	}
	if _, err := a.Cleanup(); err != nil {
		t.Fatalf("second Cleanup() error: %v", err)
	}
}

func linkLine(t *testing.T, ns *netnstest.NS, dev string) string {
	t.Helper()
	return ns.Run(t, "ip", "-d", "-o", "link", "show", "dev", dev)
}

func wantLinkUp(t *testing.T, ns *netnstest.NS, dev string, up bool) {
	t.Helper()
	line := linkLine(t, ns, dev)
	if got := strings.Contains(line, ",UP") || strings.Contains(line, "<UP"); got != up {
		t.Errorf("link %s up = %v, want %v:\n%s", dev, got, up, line)
	}
}

// ifbForDummy is the namespace's real netlink handle, except that LinkAdd
// creates an ifb link where a dummy link is asked for. It stands in on
// kernels without CONFIG_DUMMY (ifb links behave alike for our purposes: a
// plain Ethernet-like link with no lower device), so that creating,
// recreating, setting up and deleting the link is still proven against the
// real kernel.
type ifbForDummy struct {
	*rtnl
	t testing.TB
	// substituted counts the dummy links created as ifb links.
	substituted int
}

func (h *ifbForDummy) LinkAdd(link netlink.Link) error {
	if d, ok := link.(*netlink.Dummy); ok {
		h.t.Logf("kernel has no dummy links; an ifb link stands in for the dummy link %s", d.Name)
		h.substituted++
		link = &netlink.Ifb{LinkAttrs: d.LinkAttrs}
	}
	return h.rtnl.LinkAdd(link)
}

// newCreatingAddress returns an Address in ns, for a test in which it
// creates its link: with the real netlink handle on a kernel with dummy links,
// and otherwise through ifbForDummy.
func newCreatingAddress(t *testing.T, ns *netnstest.NS, iface string) *Address {
	t.Helper()
	nh, err := newRTNL(ns.NetNS(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nh.Close)
	var h netlinkHandle = nh
	if !ns.SupportsLinkKind(t, "dummy") {
		h = &ifbForDummy{rtnl: nh, t: t}
	}
	return NewAddress(h, iface, []netip.Addr{addrV4, addrV6})
}

// wantCreatedLink fails unless dev in ns is the link a created: a dummy link,
// or an ifb link created by ifbForDummy in place of one.
func wantCreatedLink(t *testing.T, ns *netnstest.NS, a *Address, dev string) {
	t.Helper()
	kind := "dummy"
	if s, ok := a.h.(*ifbForDummy); ok {
		if s.substituted == 0 {
			t.Fatalf("no dummy link was asked for, so no ifb link stands in for %s", dev)
		}
		kind = "ifb"
	}
	out := ns.Run(t, "ip", "-d", "link", "show", dev)
	if !slices.Contains(strings.Fields(out), kind) {
		t.Errorf("%s is not a %s link:\n%s", dev, kind, out)
	}
}

func TestAddressInNamespace(t *testing.T) {
	added := func(dev string) []string {
		return []string{"address added 10.96.0.2/32 on " + dev, "address added fd00::2/128 on " + dev}
	}
	created := func(dev string) []string {
		return append([]string{"link created " + dev, "link set up " + dev}, added(dev)...)
	}
	tests := []struct {
		name  string
		iface string
		// dummy marks cases where the Address creates a dummy link. On a
		// kernel without CONFIG_DUMMY an ifb link stands in for it.
		dummy bool
		// setup runs before the foreign addresses are recorded.
		setup func(t *testing.T, ns *netnstest.NS)
		run   func(t *testing.T, ns *netnstest.NS, a *Address)
		// flushed are foreign addresses the kernel itself removes when
		// setup or run set their link down; they are not compared.
		flushed []string
	}{
		{
			name:  "fresh lo gets both addresses and a second Ensure changes nothing",
			iface: "lo",
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("lo")...)
				wantManagedOn(t, ns, "lo")
				wantEnsure(t, a)
			},
		},
		{
			name:  "missing link is created as an up dummy link",
			iface: "apsc0",
			dummy: true,
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, created("apsc0")...)
				wantCreatedLink(t, ns, a, "apsc0")
				wantLinkUp(t, ns, "apsc0", true)
				wantManagedOn(t, ns, "apsc0")
				wantEnsure(t, a)
			},
		},
		{
			name:  "a later process knows the link by its alias and deletes it at cleanup",
			iface: "apsc0",
			dummy: true,
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, created("apsc0")...)
				if out := linkLine(t, ns, "apsc0"); !strings.Contains(out, "alias "+LinkAlias) {
					t.Fatalf("the created link does not carry our alias:\n%s", out)
				}
				// Another process, as after a restart: it did not create the
				// link, but the alias says it is ours.
				later, err := NewAddressAt(ns.NetNS(t), "apsc0", []netip.Addr{netip.MustParseAddr("10.96.0.3")})
				if err != nil {
					t.Fatal(err)
				}
				defer later.Close()
				removed, err := later.Cleanup()
				if err != nil {
					t.Fatal(err)
				}
				want := []string{"address removed 10.96.0.2/32 on apsc0", "address removed fd00::2/128 on apsc0", "link deleted apsc0"}
				if diff := cmp.Diff(want, repairStrings(removed)); diff != "" {
					t.Errorf("a later teardown with another address removed (-want +got):\n%s", diff)
				}
				if _, err := ns.RunErr("ip", "link", "show", "apsc0"); err == nil {
					t.Errorf("apsc0 is still there after the later teardown")
				}
			},
		},
		{
			name:  "addresses of ours on another link move to ours",
			iface: "lo",
			setup: func(t *testing.T, ns *netnstest.NS) {
				// An earlier run kept them on other0, with our mark.
				earlier, err := NewAddressAt(ns.NetNS(t), "other0", []netip.Addr{addrV4, addrV6})
				if err != nil {
					t.Fatal(err)
				}
				defer earlier.Close()
				if _, err := earlier.Ensure(); err != nil {
					t.Fatal(err)
				}
			},
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a,
					"address added 10.96.0.2/32 on lo",
					"address removed 10.96.0.2/32 on other0",
					"address added fd00::2/128 on lo",
					"address removed fd00::2/128 on other0")
				wantManagedOn(t, ns, "lo")
				wantEnsure(t, a)
			},
		},
		{
			name:  "addresses another agent holds on another link stay there",
			iface: "lo",
			setup: func(t *testing.T, ns *netnstest.NS) {
				addIPAddr(t, ns, "other0", "10.96.0.2/32")
				addIPAddr(t, ns, "other0", "fd00::2/128")
			},
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a,
					"address added 10.96.0.2/32 on lo",
					"address added fd00::2/128 on lo")
				out := ns.Run(t, "ip", "-o", "addr", "show", "dev", "other0")
				for _, want := range []string{"10.96.0.2/32", "fd00::2/128"} {
					if !strings.Contains(out, " "+want+" ") {
						t.Errorf("%s was removed from other0:\n%s", want, out)
					}
				}
				wantEnsure(t, a)
			},
		},
		{
			name:  "same IP with a wider prefix on our link becomes a host prefix",
			iface: "lo",
			setup: func(t *testing.T, ns *netnstest.NS) {
				addIPAddr(t, ns, "lo", "10.96.0.2/24")
			},
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a,
					"address removed 10.96.0.2/24 on lo",
					"address added 10.96.0.2/32 on lo",
					"address added fd00::2/128 on lo")
				wantManagedOn(t, ns, "lo")
			},
		},
		{
			name:  "deleted address is added again",
			iface: "lo",
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("lo")...)
				ns.Run(t, "ip", "addr", "del", "10.96.0.2/32", "dev", "lo")
				wantEnsure(t, a, "address added 10.96.0.2/32 on lo")
				wantManagedOn(t, ns, "lo")
			},
		},
		{
			name:  "deleted dummy link is created again",
			iface: "apsc0",
			dummy: true,
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, created("apsc0")...)
				wantCreatedLink(t, ns, a, "apsc0")
				ns.Run(t, "ip", "link", "del", "apsc0")
				wantEnsure(t, a, created("apsc0")...)
				wantCreatedLink(t, ns, a, "apsc0")
				wantLinkUp(t, ns, "apsc0", true)
				wantManagedOn(t, ns, "apsc0")
			},
		},
		{
			name:  "down dummy link we created is set up and its IPv6 address restored",
			iface: "apsc0",
			dummy: true,
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, created("apsc0")...)
				wantCreatedLink(t, ns, a, "apsc0")
				ns.Run(t, "ip", "link", "set", "apsc0", "down") // the kernel drops IPv6 addresses
				wantEnsure(t, a, "link set up apsc0", "address added fd00::2/128 on apsc0")
				wantLinkUp(t, ns, "apsc0", true)
				wantManagedOn(t, ns, "apsc0")
			},
		},
		{
			name:    "down lo is set up and its IPv6 address restored",
			iface:   "lo",
			flushed: []string{"2001:db8::7/128"},
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("lo")...)
				ns.Run(t, "ip", "link", "set", "lo", "down") // the kernel drops IPv6 addresses
				wantEnsure(t, a, "link set up lo", "address added fd00::2/128 on lo")
				wantLinkUp(t, ns, "lo", true)
				wantManagedOn(t, ns, "lo")
			},
		},
		{
			name:    "down link that existed before is left down",
			iface:   "other0",
			flushed: []string{"2001:db8:1::1/64"},
			setup: func(t *testing.T, ns *netnstest.NS) {
				ns.Run(t, "ip", "link", "set", "other0", "down")
			},
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("other0")...)
				wantLinkUp(t, ns, "other0", false)
				wantManagedOn(t, ns, "other0")
				wantEnsure(t, a)
			},
		},
		{
			name:  "cleanup removes the addresses and the dummy link we created",
			iface: "apsc0",
			dummy: true,
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, created("apsc0")...)
				wantCreatedLink(t, ns, a, "apsc0")
				wantCleanup(t, a)
				wantNoManaged(t, ns)
				if out, err := ns.RunErr("ip", "link", "show", "dev", "apsc0"); err == nil {
					t.Errorf("apsc0 still exists after Cleanup():\n%s", out)
				}
			},
		},
		{
			name:  "cleanup on lo leaves lo up without our addresses",
			iface: "lo",
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("lo")...)
				wantCleanup(t, a)
				wantNoManaged(t, ns)
				wantLinkUp(t, ns, "lo", true)
			},
		},
		{
			name:  "cleanup on a link that existed before keeps the link",
			iface: "other0",
			run: func(t *testing.T, ns *netnstest.NS, a *Address) {
				wantEnsure(t, a, added("other0")...)
				wantCleanup(t, a)
				wantNoManaged(t, ns)
				wantLinkUp(t, ns, "other0", true)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			addForeignLink(t, ns, "other0")
			for _, f := range foreignAddrs {
				addIPAddr(t, ns, f.dev, f.cidr)
			}
			if tt.setup != nil {
				tt.setup(t, ns)
			}
			before := foreignLines(t, ns, tt.flushed)
			if len(before) != len(foreignAddrs)-len(tt.flushed) {
				t.Fatalf("foreign addresses not set up:\n%s", strings.Join(before, "\n"))
			}

			var a *Address
			if tt.dummy {
				a = newCreatingAddress(t, ns, tt.iface)
			} else {
				var err error
				a, err = NewAddressAt(ns.NetNS(t), tt.iface, []netip.Addr{addrV4, addrV6})
				if err != nil {
					t.Fatalf("NewAddressAt() error: %v", err)
				}
			}
			t.Cleanup(a.Close)
			tt.run(t, ns, a)

			if diff := cmp.Diff(before, foreignLines(t, ns, tt.flushed)); diff != "" {
				t.Errorf("foreign addresses changed (-before +after):\n%s", diff)
			}
		})
	}
}

// The fake can only imitate netlink's not-found error; this proves the real
// one is recognised, which decides between creating a link and failing.
func TestRealNetlinkMissingLinkIsNotFound(t *testing.T) {
	h := netnstest.New(t).Handle(t)
	if _, err := h.LinkByName("apsc-missing"); !isLinkNotFound(err) {
		t.Errorf("LinkByName(missing) error = %v, want a netlink.LinkNotFoundError", err)
	}
	if _, err := h.LinkByIndex(4242); !isLinkNotFound(err) {
		t.Errorf("LinkByIndex(missing) error = %v, want a netlink.LinkNotFoundError", err)
	}
}
