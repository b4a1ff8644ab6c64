package apply

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeLinkNotFound is what fakeNetlink returns for a missing link. The
// embedded error of netlink.LinkNotFoundError cannot be set outside netlink,
// so it is only reachable through Unwrap, as errors.As does.
type fakeLinkNotFound struct{ what string }

func (e fakeLinkNotFound) Error() string { return "link " + e.what + " not found" }
func (e fakeLinkNotFound) Unwrap() error { return netlink.LinkNotFoundError{} }

type fakeLink struct {
	name  string
	index int
	flags net.Flags
	kind  string
	alias string
}

// fakeNetlink keeps links and addresses in memory, refuses what the kernel
// would refuse, and records every mutating call in order.
type fakeNetlink struct {
	links     []*fakeLink
	addrs     map[int][]ifAddr
	nextIndex int
	calls     []string
	// fail makes the named method ("AddrAdd", ...) return the error when
	// called for the link named in the key: "AddrAdd lo".
	fail map[string]error
}

// newFake returns a fake with a loopback "lo" (up, index 1) and the given
// extra links. Each addrs entry is "link cidr", followed by "scope=N"
// and/or "ours" (carries AddressProtocol) or "proto=N".
func newFake(t *testing.T, links []fakeLink, addrs ...string) *fakeNetlink {
	t.Helper()
	f := &fakeNetlink{addrs: map[int][]ifAddr{}, nextIndex: 1}
	f.links = append(f.links, &fakeLink{name: "lo", index: f.take(), flags: net.FlagUp | net.FlagLoopback, kind: "device"})
	for _, l := range links {
		l.index = f.take()
		if l.kind == "" {
			l.kind = "dummy"
		}
		f.links = append(f.links, &l)
	}
	for _, s := range addrs {
		fields := strings.Fields(s)
		l := f.byName(fields[0])
		if l == nil {
			t.Fatalf("fake address %q: no link %s", s, fields[0])
		}
		ip, ipnet, err := net.ParseCIDR(fields[1])
		if err != nil {
			t.Fatalf("fake address %q: %v", s, err)
		}
		ipnet.IP = ip
		a := ifAddr{Addr: netlink.Addr{IPNet: ipnet, LinkIndex: l.index}}
		for _, opt := range fields[2:] {
			var err error
			switch {
			case opt == "ours":
				a.Proto = AddressProtocol
			case strings.HasPrefix(opt, "proto="):
				_, err = fmt.Sscanf(opt, "proto=%d", &a.Proto)
			default:
				_, err = fmt.Sscanf(opt, "scope=%d", &a.Scope)
			}
			if err != nil {
				t.Fatalf("fake address %q: %v", s, err)
			}
		}
		f.addrs[l.index] = append(f.addrs[l.index], a)
	}
	return f
}

func (f *fakeNetlink) take() int {
	i := f.nextIndex
	f.nextIndex++
	return i
}

func (f *fakeNetlink) byName(name string) *fakeLink {
	for _, l := range f.links {
		if l.name == name {
			return l
		}
	}
	return nil
}

func (f *fakeNetlink) byIndex(index int) *fakeLink {
	for _, l := range f.links {
		if l.index == index {
			return l
		}
	}
	return nil
}

// resolve finds the fake link for a netlink.Link, by index like the kernel.
func (f *fakeNetlink) resolve(link netlink.Link) (*fakeLink, error) {
	if l := f.byIndex(link.Attrs().Index); l != nil {
		return l, nil
	}
	return nil, unix.ENODEV
}

func (f *fakeNetlink) record(method string, l *fakeLink, arg string) error {
	call := method + " " + l.name
	if arg != "" {
		call += " " + arg
	}
	f.calls = append(f.calls, call)
	return f.fail[method+" "+l.name]
}

func toLink(l *fakeLink) netlink.Link {
	attrs := netlink.LinkAttrs{Name: l.name, Index: l.index, Flags: l.flags, Alias: l.alias}
	if l.kind == "dummy" {
		return &netlink.Dummy{LinkAttrs: attrs}
	}
	return &netlink.Device{LinkAttrs: attrs}
}

func (f *fakeNetlink) LinkByName(name string) (netlink.Link, error) {
	if err := f.fail["LinkByName "+name]; err != nil {
		return nil, err
	}
	if l := f.byName(name); l != nil {
		return toLink(l), nil
	}
	return nil, fakeLinkNotFound{name}
}

func (f *fakeNetlink) LinkByIndex(index int) (netlink.Link, error) {
	if l := f.byIndex(index); l != nil {
		return toLink(l), nil
	}
	return nil, fakeLinkNotFound{fmt.Sprint(index)}
}

func (f *fakeNetlink) LinkAdd(link netlink.Link) error {
	l := &fakeLink{name: link.Attrs().Name, kind: link.Type()}
	if err := f.record("LinkAdd", l, link.Type()); err != nil {
		return err
	}
	if f.byName(l.name) != nil {
		return unix.EEXIST
	}
	l.index = f.take()
	f.links = append(f.links, l)
	return nil
}

func (f *fakeNetlink) LinkDel(link netlink.Link) error {
	l, err := f.resolve(link)
	if err != nil {
		return err
	}
	if err := f.record("LinkDel", l, ""); err != nil {
		return err
	}
	f.links = slices.DeleteFunc(f.links, func(x *fakeLink) bool { return x == l })
	delete(f.addrs, l.index)
	return nil
}

func (f *fakeNetlink) LinkSetAlias(link netlink.Link, alias string) error {
	l, err := f.resolve(link)
	if err != nil {
		return err
	}
	if err := f.record("LinkSetAlias", l, alias); err != nil {
		return err
	}
	l.alias = alias
	return nil
}

func (f *fakeNetlink) LinkSetUp(link netlink.Link) error {
	l, err := f.resolve(link)
	if err != nil {
		return err
	}
	if err := f.record("LinkSetUp", l, ""); err != nil {
		return err
	}
	l.flags |= net.FlagUp
	return nil
}

func (f *fakeNetlink) AddrList(link netlink.Link, family int) ([]ifAddr, error) {
	var out []ifAddr
	for _, l := range f.links {
		if link != nil && link.Attrs().Index != l.index {
			continue
		}
		for _, a := range f.addrs[l.index] {
			is4 := a.IP.To4() != nil
			if family == netlink.FAMILY_ALL || (family == netlink.FAMILY_V4) == is4 {
				out = append(out, a)
			}
		}
	}
	return out, nil
}

func addrString(a *netlink.Addr) string {
	return fmt.Sprintf("%s scope=%d flags=%#x", a.IPNet, a.Scope, a.Flags)
}

// AddrAdd adds the address, or replaces the one with the same address and
// prefix on the link, as NLM_F_CREATE|NLM_F_REPLACE does.
func (f *fakeNetlink) AddrAdd(link netlink.Link, addr *netlink.Addr, proto uint8) error {
	l, err := f.resolve(link)
	if err != nil {
		return err
	}
	arg := addrString(addr)
	if proto != 0 {
		arg += fmt.Sprintf(" proto=%d", proto)
	}
	if err := f.record("AddrAdd", l, arg); err != nil {
		return err
	}
	a := ifAddr{Addr: *addr, Proto: proto}
	a.LinkIndex = l.index
	for i, x := range f.addrs[l.index] {
		if x.Equal(*addr) {
			f.addrs[l.index][i] = a
			return nil
		}
	}
	f.addrs[l.index] = append(f.addrs[l.index], a)
	return nil
}

func (f *fakeNetlink) AddrDel(link netlink.Link, addr *netlink.Addr) error {
	l, err := f.resolve(link)
	if err != nil {
		return err
	}
	if err := f.record("AddrDel", l, addr.IPNet.String()); err != nil {
		return err
	}
	n := len(f.addrs[l.index])
	f.addrs[l.index] = slices.DeleteFunc(f.addrs[l.index], func(a ifAddr) bool { return a.Equal(*addr) })
	if len(f.addrs[l.index]) == n {
		return unix.EADDRNOTAVAIL
	}
	return nil
}

// state renders every link with its flags and addresses, for comparison.
func (f *fakeNetlink) state() []string {
	var out []string
	for _, l := range f.links {
		up := "down"
		if l.flags&net.FlagUp != 0 {
			up = "up"
		}
		line := l.name + " " + up
		for _, a := range f.addrs[l.index] {
			line += " " + a.IPNet.String()
			if a.Scope != 0 {
				line += fmt.Sprintf(" scope=%d", a.Scope)
			}
			if a.Proto == AddressProtocol {
				line += " (ours)"
			} else if a.Proto != 0 {
				line += fmt.Sprintf(" (proto=%d)", a.Proto)
			}
		}
		out = append(out, line)
	}
	return out
}

var (
	addrV4      = netip.MustParseAddr("10.96.0.2")
	addrV6      = netip.MustParseAddr("fd00::2")
	clusterIPV4 = netip.MustParseAddr("100.64.0.1")
)

func TestAddressEnsure(t *testing.T) {
	tests := []struct {
		name  string
		links []fakeLink
		addrs []string // initial addresses, see newFake
		iface string
		want  []netip.Addr
		// prime runs Ensure once first, then between changes the fake;
		// calls and repairs of the priming run are not checked.
		prime   bool
		between func(f *fakeNetlink)

		wantCalls    []string
		wantRepairs  []string
		wantWarnings int
		wantState    []string
	}{
		{
			name:        "fresh lo gets the address",
			iface:       "lo",
			want:        []netip.Addr{addrV4},
			wantCalls:   []string{"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97"},
			wantRepairs: []string{"address added 10.96.0.2/32 on lo"},
			wantState:   []string{"lo up 10.96.0.2/32 (ours)"},
		},
		{
			name:      "converged state makes no change",
			iface:     "lo",
			want:      []netip.Addr{addrV4, addrV6},
			addrs:     []string{"lo 10.96.0.2/32 ours", "lo fd00::2/128 ours"},
			wantState: []string{"lo up 10.96.0.2/32 (ours) fd00::2/128 (ours)"},
		},
		{
			name:  "address of ours on another link is added here and removed there",
			links: []fakeLink{{name: "eth0", flags: net.FlagUp}},
			addrs: []string{"eth0 10.96.0.2/32 ours", "eth0 192.168.1.5/24"},
			iface: "lo",
			want:  []netip.Addr{addrV4},
			wantCalls: []string{
				"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97",
				"AddrDel eth0 10.96.0.2/32",
			},
			wantRepairs: []string{
				"address added 10.96.0.2/32 on lo",
				"address removed 10.96.0.2/32 on eth0",
			},
			wantState: []string{"lo up 10.96.0.2/32 (ours)", "eth0 up 192.168.1.5/24"},
		},
		{
			name:  "missing link is created as dummy, set up and given the address",
			iface: "apiproxy0",
			want:  []netip.Addr{addrV4},
			wantCalls: []string{
				"LinkAdd apiproxy0 dummy",
				"LinkSetAlias apiproxy0 apiserver-proxy-sidecar",
				"LinkSetUp apiproxy0",
				"AddrAdd apiproxy0 10.96.0.2/32 scope=0 flags=0x0 proto=97",
			},
			wantRepairs: []string{
				"link created apiproxy0",
				"link set up apiproxy0",
				"address added 10.96.0.2/32 on apiproxy0",
			},
			wantState: []string{"lo up", "apiproxy0 up 10.96.0.2/32 (ours)"},
		},
		{
			name:  "down link created by us is set up again",
			iface: "apiproxy0",
			want:  []netip.Addr{addrV4},
			prime: true,
			between: func(f *fakeNetlink) {
				f.byName("apiproxy0").flags &^= net.FlagUp
			},
			wantCalls:   []string{"LinkSetUp apiproxy0"},
			wantRepairs: []string{"link set up apiproxy0"},
			wantState:   []string{"lo up", "apiproxy0 up 10.96.0.2/32 (ours)"},
		},
		{
			name: "down loopback is set up",
			between: func(f *fakeNetlink) {
				f.byName("lo").flags &^= net.FlagUp
			},
			iface:       "lo",
			want:        []netip.Addr{addrV4},
			addrs:       []string{"lo 10.96.0.2/32 ours"},
			wantCalls:   []string{"LinkSetUp lo"},
			wantRepairs: []string{"link set up lo"},
			wantState:   []string{"lo up 10.96.0.2/32 (ours)"},
		},
		{
			name:         "down link that existed before is left down with a warning",
			links:        []fakeLink{{name: "eth1"}},
			iface:        "eth1",
			want:         []netip.Addr{addrV4},
			wantCalls:    []string{"AddrAdd eth1 10.96.0.2/32 scope=0 flags=0x0 proto=97"},
			wantRepairs:  []string{"address added 10.96.0.2/32 on eth1"},
			wantWarnings: 1,
			wantState:    []string{"lo up", "eth1 down 10.96.0.2/32 (ours)"},
		},
		{
			name:         "warning about a down link is logged once per episode",
			links:        []fakeLink{{name: "eth1"}},
			iface:        "eth1",
			want:         []netip.Addr{addrV4},
			prime:        true,
			wantWarnings: 1,
			wantState:    []string{"lo up", "eth1 down 10.96.0.2/32 (ours)"},
		},
		{
			name:  "same IP with a wider prefix on our link is replaced by the host prefix",
			iface: "lo",
			want:  []netip.Addr{addrV4},
			addrs: []string{"lo 10.96.0.2/24", "lo 192.0.2.7/32"},
			wantCalls: []string{
				"AddrDel lo 10.96.0.2/24",
				"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97",
			},
			wantRepairs: []string{
				"address removed 10.96.0.2/24 on lo",
				"address added 10.96.0.2/32 on lo",
			},
			wantState: []string{"lo up 192.0.2.7/32 10.96.0.2/32 (ours)"},
		},
		{
			name:  "host scope is replaced by universe scope",
			iface: "lo",
			want:  []netip.Addr{addrV4},
			addrs: []string{"lo 10.96.0.2/32 scope=254"},
			wantCalls: []string{
				"AddrDel lo 10.96.0.2/32",
				"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97",
			},
			wantRepairs: []string{
				"address removed 10.96.0.2/32 on lo",
				"address added 10.96.0.2/32 on lo",
			},
			wantState: []string{"lo up 10.96.0.2/32 (ours)"},
		},
		{
			name:  "dual stack adds both families, IPv6 without DAD",
			links: []fakeLink{{name: "eth0", flags: net.FlagUp}},
			addrs: []string{"eth0 fd00::2/128 ours", "eth0 fd00::3/128", "eth0 10.96.0.3/32"},
			iface: "lo",
			want:  []netip.Addr{addrV4, addrV6},
			wantCalls: []string{
				"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97",
				"AddrAdd lo fd00::2/128 scope=0 flags=0x2 proto=97",
				"AddrDel eth0 fd00::2/128",
			},
			wantRepairs: []string{
				"address added 10.96.0.2/32 on lo",
				"address added fd00::2/128 on lo",
				"address removed fd00::2/128 on eth0",
			},
			wantState: []string{"lo up 10.96.0.2/32 (ours) fd00::2/128 (ours)", "eth0 up fd00::3/128 10.96.0.3/32"},
		},
		{
			name:  "an unmarked address on lo moves to our link",
			links: []fakeLink{{name: "apiproxy0", flags: net.FlagUp, alias: LinkAlias}},
			addrs: []string{"lo 10.96.0.2/32"},
			iface: "apiproxy0",
			want:  []netip.Addr{addrV4},
			wantCalls: []string{
				"AddrAdd apiproxy0 10.96.0.2/32 scope=0 flags=0x0 proto=97",
				"AddrDel lo 10.96.0.2/32",
			},
			wantRepairs: []string{
				"address added 10.96.0.2/32 on apiproxy0",
				"address removed 10.96.0.2/32 on lo",
			},
			wantState: []string{"lo up", "apiproxy0 up 10.96.0.2/32 (ours)"},
		},
		{
			name:         "an address another agent holds on another link stays there, logged once",
			links:        []fakeLink{{name: "nodelocaldns", flags: net.FlagUp}},
			addrs:        []string{"nodelocaldns 10.96.0.2/32 proto=4"},
			iface:        "lo",
			want:         []netip.Addr{addrV4},
			prime:        true,
			wantWarnings: 1,
			wantState:    []string{"lo up 10.96.0.2/32 (ours)", "nodelocaldns up 10.96.0.2/32 (proto=4)"},
		},
		{
			name:        "a configured address without our mark is marked in place",
			iface:       "lo",
			want:        []netip.Addr{addrV4, addrV6},
			addrs:       []string{"lo 10.96.0.2/32", "lo fd00::2/128 ours"},
			wantCalls:   []string{"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97"},
			wantRepairs: []string{"address marked 10.96.0.2/32 on lo"},
			wantState:   []string{"lo up 10.96.0.2/32 (ours) fd00::2/128 (ours)"},
		},
		{
			name:      "a link with our alias is ours: set up again after a restart",
			links:     []fakeLink{{name: "apiproxy0", alias: LinkAlias}},
			addrs:     []string{"apiproxy0 10.96.0.2/32 ours"},
			iface:     "apiproxy0",
			want:      []netip.Addr{addrV4},
			wantCalls: []string{"LinkSetUp apiproxy0"},
			wantRepairs: []string{
				"link set up apiproxy0",
			},
			wantState: []string{"lo up", "apiproxy0 up 10.96.0.2/32 (ours)"},
		},
		{
			name:  "proxy address and ClusterIP, in the order given",
			iface: "lo",
			want:  []netip.Addr{addrV4, clusterIPV4},
			addrs: []string{"lo 10.96.0.2/32 ours"},
			wantCalls: []string{
				"AddrAdd lo 100.64.0.1/32 scope=0 flags=0x0 proto=97",
			},
			wantRepairs: []string{"address added 100.64.0.1/32 on lo"},
			wantState:   []string{"lo up 10.96.0.2/32 (ours) 100.64.0.1/32 (ours)"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, tt.links, tt.addrs...)
			a := NewAddress(f, tt.iface, tt.want)
			a.marks = true
			var warnings []string
			a.warn = func(msg string, _ ...any) { warnings = append(warnings, msg) }
			if tt.prime {
				if _, err := a.Ensure(); err != nil {
					t.Fatalf("priming Ensure() error: %v", err)
				}
				f.calls = nil
			}
			if tt.between != nil {
				tt.between(f)
			}

			repairs, err := a.Ensure()
			if err != nil {
				t.Fatalf("Ensure() error: %v", err)
			}
			if diff := cmp.Diff(tt.wantCalls, f.calls); diff != "" {
				t.Errorf("mutating calls (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantRepairs, repairStrings(repairs)); diff != "" {
				t.Errorf("repairs (-want +got):\n%s", diff)
			}
			if len(warnings) != tt.wantWarnings {
				t.Errorf("got %d warnings %q, want %d", len(warnings), warnings, tt.wantWarnings)
			}
			if diff := cmp.Diff(tt.wantState, f.state()); diff != "" {
				t.Errorf("state (-want +got):\n%s", diff)
			}

			// Whatever it repaired, the next Ensure only reads.
			f.calls = nil
			again, err := a.Ensure()
			if err != nil {
				t.Fatalf("second Ensure() error: %v", err)
			}
			if len(f.calls) != 0 || len(again) != 0 {
				t.Errorf("second Ensure() changed %q, repairs %v; want no change", f.calls, again)
			}
		})
	}
}

func TestAddressCleanup(t *testing.T) {
	tests := []struct {
		name      string
		links     []fakeLink
		addrs     []string
		iface     string
		want      []netip.Addr
		ensure    bool // run Ensure first, so a missing link is created by us
		wantCalls []string
		wantState []string
	}{
		{
			name:   "link created by us loses the address and is deleted",
			iface:  "apiproxy0",
			want:   []netip.Addr{addrV4, addrV6},
			ensure: true,
			wantCalls: []string{
				"AddrDel apiproxy0 10.96.0.2/32",
				"AddrDel apiproxy0 fd00::2/128",
				"LinkDel apiproxy0",
			},
			wantState: []string{"lo up"},
		},
		{
			name:      "lo loses only our address and is kept",
			iface:     "lo",
			want:      []netip.Addr{addrV4},
			addrs:     []string{"lo 192.0.2.7/32", "lo 10.96.0.2/24"},
			ensure:    true,
			wantCalls: []string{"AddrDel lo 10.96.0.2/32"},
			wantState: []string{"lo up 192.0.2.7/32"},
		},
		{
			name:      "link that existed before loses the address and is kept",
			links:     []fakeLink{{name: "eth1", flags: net.FlagUp}},
			addrs:     []string{"eth1 10.96.0.2/32", "eth1 198.51.100.1/24"},
			iface:     "eth1",
			want:      []netip.Addr{addrV4},
			ensure:    true,
			wantCalls: []string{"AddrDel eth1 10.96.0.2/32"},
			wantState: []string{"lo up", "eth1 up 198.51.100.1/24"},
		},
		{
			name:      "nothing to clean makes no change",
			iface:     "lo",
			want:      []netip.Addr{addrV4},
			addrs:     []string{"lo 10.96.0.2/24"},
			wantState: []string{"lo up 10.96.0.2/24"},
		},
		{
			name:      "missing link makes no change",
			iface:     "apiproxy0",
			want:      []netip.Addr{addrV4},
			wantState: []string{"lo up"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, tt.links, tt.addrs...)
			a := NewAddress(f, tt.iface, tt.want)
			if tt.ensure {
				if _, err := a.Ensure(); err != nil {
					t.Fatalf("Ensure() error: %v", err)
				}
				f.calls = nil
			}
			if _, err := a.Cleanup(); err != nil {
				t.Fatalf("Cleanup() error: %v", err)
			}
			if diff := cmp.Diff(tt.wantCalls, f.calls); diff != "" {
				t.Errorf("mutating calls (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantState, f.state()); diff != "" {
				t.Errorf("state (-want +got):\n%s", diff)
			}

			f.calls = nil
			if _, err := a.Cleanup(); err != nil {
				t.Fatalf("second Cleanup() error: %v", err)
			}
			if len(f.calls) != 0 {
				t.Errorf("second Cleanup() made calls %q, want none", f.calls)
			}
		})
	}
}

func TestAddressErrorsNameLinkAndAddress(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name      string
		iface     string
		fail      string
		cleanup   bool
		wantIn    []string // substrings of the error
		wantCalls []string // mutating calls, proving later steps still ran
	}{
		{
			name:   "reading the link",
			iface:  "lo",
			fail:   "LinkByName lo",
			wantIn: []string{"link lo"},
		},
		{
			name:      "creating the link",
			iface:     "apiproxy0",
			fail:      "LinkAdd apiproxy0",
			wantIn:    []string{"dummy link apiproxy0"},
			wantCalls: []string{"LinkAdd apiproxy0 dummy"},
		},
		{
			name:   "adding the IPv4 address still adds the IPv6 one",
			iface:  "lo",
			fail:   "AddrAdd lo",
			wantIn: []string{"10.96.0.2/32", "lo"},
			wantCalls: []string{
				"AddrAdd lo 10.96.0.2/32 scope=0 flags=0x0 proto=97",
				"AddrAdd lo fd00::2/128 scope=0 flags=0x2 proto=97",
			},
		},
		{
			name:    "cleanup still deletes the created link",
			iface:   "apiproxy0",
			fail:    "AddrDel apiproxy0",
			cleanup: true,
			wantIn:  []string{"10.96.0.2/32", "fd00::2/128", "apiproxy0"},
			wantCalls: []string{
				"AddrDel apiproxy0 10.96.0.2/32",
				"AddrDel apiproxy0 fd00::2/128",
				"LinkDel apiproxy0",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, nil)
			a := NewAddress(f, tt.iface, []netip.Addr{addrV4, addrV6})
			if tt.cleanup {
				if _, err := a.Ensure(); err != nil {
					t.Fatalf("Ensure() error: %v", err)
				}
				f.calls = nil
			}
			f.fail = map[string]error{tt.fail: boom}
			var err error
			if tt.cleanup {
				_, err = a.Cleanup()
			} else {
				_, err = a.Ensure()
			}
			if !errors.Is(err, boom) {
				t.Fatalf("got error %v, want it to wrap %v", err, boom)
			}
			for _, s := range tt.wantIn {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not name %q", err, s)
				}
			}
			if diff := cmp.Diff(tt.wantCalls, f.calls); diff != "" {
				t.Errorf("mutating calls (-want +got):\n%s", diff)
			}
		})
	}
}

func TestAddressClosedRefusesWork(t *testing.T) {
	f := newFake(t, nil)
	a := NewAddress(f, "lo", []netip.Addr{addrV4})
	a.Close()
	if _, err := a.Ensure(); !errors.Is(err, errClosed) {
		t.Errorf("Ensure() after Close() error = %v, want %v", err, errClosed)
	}
	if _, err := a.Cleanup(); !errors.Is(err, errClosed) {
		t.Errorf("Cleanup() after Close() error = %v, want %v", err, errClosed)
	}
	if len(f.calls) != 0 {
		t.Errorf("closed Address made calls %q", f.calls)
	}
}

func TestRepairObjectLabelsLinkAndAddress(t *testing.T) {
	for kind, want := range map[RepairKind]Object{
		RepairLinkCreated:    ObjectLink,
		RepairLinkUp:         ObjectLink,
		RepairLinkDeleted:    ObjectLink,
		RepairAddressAdded:   ObjectAddress,
		RepairAddressRemoved: ObjectAddress,
		RepairAddressMarked:  ObjectAddress,
		RepairStaleRemoved:   ObjectAddress,
	} {
		if got := kind.Object(); got != want {
			t.Errorf("%q.Object() = %q, want %q", kind, got, want)
		}
	}
}

func repairStrings(rs Repairs) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return out
}

// TestAddressSweep proves that an address of ours that is no longer
// configured goes, on any link, and that nothing without our mark does.
func TestAddressSweep(t *testing.T) {
	f := newFake(t, []fakeLink{{name: "apiproxy0", flags: net.FlagUp, alias: LinkAlias}, {name: "eth0", flags: net.FlagUp}},
		"lo 10.96.0.2/32 ours",        // configured before, moved since
		"apiproxy0 10.96.0.3/32 ours", // configured now
		"apiproxy0 10.96.0.9/32",      // someone else's, on our link
		"apiproxy0 fd00::2/128 ours",  // configured before
		"eth0 192.168.1.5/24 proto=4", // someone else's
		"eth0 100.64.0.1/32 ours",     // ours, from an older configuration
	)
	a := NewAddress(f, "apiproxy0", []netip.Addr{netip.MustParseAddr("10.96.0.3")})
	a.marks = true
	repairs, err := a.Sweep()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"stale address removed 10.96.0.2/32 on lo",
		"stale address removed 100.64.0.1/32 on eth0",
		"stale address removed fd00::2/128 on apiproxy0",
	}
	got := repairStrings(repairs)
	slices.Sort(got)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("repairs (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"lo up", "apiproxy0 up 10.96.0.3/32 (ours) 10.96.0.9/32", "eth0 up 192.168.1.5/24 (proto=4)"}, f.state()); diff != "" {
		t.Errorf("state (-want +got):\n%s", diff)
	}

	// Without the kernel's mark nothing can be told apart: nothing goes.
	f = newFake(t, nil, "lo 10.96.0.2/32")
	a = NewAddress(f, "lo", []netip.Addr{netip.MustParseAddr("10.96.0.3")})
	a.marks = false
	if repairs, err := a.Sweep(); err != nil || len(repairs) != 0 || len(f.calls) != 0 {
		t.Errorf("Sweep without marks: repairs %q, calls %q, error %v; want nothing", repairStrings(repairs), f.calls, err)
	}
}

// TestAddressCleanupRemovesAllOfOurs proves that teardown with another
// --ip-address than the one the addresses were added with still removes
// every address of ours and our link, and nothing else.
func TestAddressCleanupRemovesAllOfOurs(t *testing.T) {
	f := newFake(t, []fakeLink{{name: "apiproxy0", flags: net.FlagUp, alias: LinkAlias}, {name: "eth0", flags: net.FlagUp}},
		"lo 10.96.0.9/32",
		"lo 10.96.0.3/32 ours",
		"apiproxy0 10.96.0.2/32",
		"eth0 100.64.0.1/32 ours",
		"eth0 192.168.1.5/24",
	)
	// Configured with 10.96.0.2 (stale: the addresses now are others).
	a := NewAddress(f, "apiproxy0", []netip.Addr{addrV4})
	removed, err := a.Cleanup()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"address removed 10.96.0.3/32 on lo",
		"address removed 10.96.0.2/32 on apiproxy0",
		"address removed 100.64.0.1/32 on eth0",
		"link deleted apiproxy0",
	}
	if diff := cmp.Diff(want, repairStrings(removed)); diff != "" {
		t.Errorf("removed (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"lo up 10.96.0.9/32", "eth0 up 192.168.1.5/24"}, f.state()); diff != "" {
		t.Errorf("state (-want +got):\n%s", diff)
	}
	// A link without our alias that this process did not create stays.
	f = newFake(t, []fakeLink{{name: "eth1", flags: net.FlagUp}}, "eth1 10.96.0.2/32 ours")
	a = NewAddress(f, "eth1", []netip.Addr{addrV4})
	removed, err = a.Cleanup()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"address removed 10.96.0.2/32 on eth1"}, repairStrings(removed)); diff != "" {
		t.Errorf("removed (-want +got):\n%s", diff)
	}
}

// TestAddressNeverTouchesKubeIPVS proves that an address kube-proxy's IPVS
// holds is an error naming the cause, is not added to our link, and is
// removed from kube-ipvs0 by neither Ensure, Sweep nor Cleanup.
func TestAddressNeverTouchesKubeIPVS(t *testing.T) {
	f := newFake(t, []fakeLink{{name: IPVSLink, flags: net.FlagUp}}, "kube-ipvs0 100.64.0.1/32", "kube-ipvs0 100.64.0.10/32 ours")
	a := NewAddress(f, "lo", []netip.Addr{addrV4, clusterIPV4})
	a.marks = true
	repairs, err := a.Ensure()
	var ae *AddressError
	if !errors.As(err, &ae) || ae.Cause != CauseIPVS || ae.Link != IPVSLink || ae.Addr != clusterIPV4 {
		t.Fatalf("Ensure() error = %v, want an AddressError for 100.64.0.1 on kube-ipvs0", err)
	}
	if !strings.Contains(err.Error(), "IPVS") || !strings.Contains(err.Error(), "--ip-address") {
		t.Errorf("error %q must name IPVS and what to change", err)
	}
	if diff := cmp.Diff([]string{"address added 10.96.0.2/32 on lo"}, repairStrings(repairs)); diff != "" {
		t.Errorf("repairs (-want +got):\n%s", diff)
	}
	if _, err := a.Sweep(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"lo up", "kube-ipvs0 up 100.64.0.1/32 100.64.0.10/32 (ours)"}, f.state()); diff != "" {
		t.Errorf("state after Ensure, Sweep and Cleanup (-want +got):\n%s", diff)
	}
	for _, c := range f.calls {
		if strings.Contains(c, IPVSLink) {
			t.Errorf("call %q touched kube-ipvs0", c)
		}
	}
}

// TestAddressIPv6Disabled proves the causes named for IPv6 that cannot be
// served, and that a dual-stack Ensure serves IPv4 where IPv6 is off.
func TestAddressIPv6Disabled(t *testing.T) {
	proc := func(files map[string]string) func(string) ([]byte, error) {
		return func(path string) ([]byte, error) {
			if v, ok := files[path]; ok {
				return []byte(v + "\n"), nil
			}
			return nil, os.ErrNotExist
		}
	}
	const all, lo = "/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/lo/disable_ipv6"
	for _, tc := range []struct {
		name      string
		files     map[string]string
		addrs     []netip.Addr
		wantErr   string // "" for success
		wantState string
		warnings  int
	}{
		{"node-wide, dual-stack: IPv4 served, IPv6 skipped", map[string]string{all: "1", lo: "1"}, []netip.Addr{addrV4, addrV6}, "", "lo up 10.96.0.2/32 (ours)", 1},
		{"node-wide, IPv6 only: an error naming it", map[string]string{all: "1", lo: "1"}, []netip.Addr{addrV6}, "IPv6 is disabled on this node (net.ipv6.conf.all.disable_ipv6=1)", "lo up", 1},
		{"absent from the kernel", map[string]string{}, []netip.Addr{addrV4, addrV6}, "", "lo up 10.96.0.2/32 (ours)", 1},
		{"on the interface alone: an error naming it", map[string]string{all: "0", lo: "1"}, []netip.Addr{addrV4, addrV6}, "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1)", "lo up 10.96.0.2/32 (ours)", 0},
		{"enabled", map[string]string{all: "0", lo: "0"}, []netip.Addr{addrV4, addrV6}, "", "lo up 10.96.0.2/32 (ours) fd00::2/128 (ours)", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, nil)
			a := NewAddress(f, "lo", tc.addrs)
			a.marks = true
			a.proc = proc(tc.files)
			var warnings []string
			a.warn = func(msg string, _ ...any) { warnings = append(warnings, msg) }
			for range 2 { // the warning is logged once while it holds
				_, err := a.Ensure()
				switch {
				case tc.wantErr == "" && err != nil:
					t.Fatalf("Ensure() error: %v", err)
				case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
					t.Fatalf("Ensure() error = %v, want it to say %q", err, tc.wantErr)
				}
			}
			if diff := cmp.Diff([]string{tc.wantState}, f.state()); diff != "" {
				t.Errorf("state (-want +got):\n%s", diff)
			}
			if len(warnings) != tc.warnings {
				t.Errorf("warnings %q, want %d", warnings, tc.warnings)
			}
		})
	}
}

// TestAddressErrorCauses proves that the kernel's errno becomes a cause an
// operator can act on.
func TestAddressErrorCauses(t *testing.T) {
	for _, tc := range []struct {
		fail  string
		err   error
		iface string
		want  Cause
	}{
		{"AddrAdd lo", unix.EPERM, "lo", CausePermission},
		{"AddrAdd lo", unix.EACCES, "lo", CausePermission},
		{"LinkAdd apiproxy0", unix.EOPNOTSUPP, "apiproxy0", CauseNoDummy},
	} {
		f := newFake(t, nil)
		f.fail = map[string]error{tc.fail: tc.err}
		a := NewAddress(f, tc.iface, []netip.Addr{addrV4})
		a.proc = func(string) ([]byte, error) { return []byte("0\n"), nil }
		_, err := a.Ensure()
		var ae *AddressError
		if !errors.As(err, &ae) || ae.Cause != tc.want {
			t.Errorf("%s failing with %v: error %v, want cause %q", tc.fail, tc.err, err, tc.want)
		}
		if err != nil && !strings.Contains(err.Error(), string(tc.want)) {
			t.Errorf("error %q does not say %q", err, tc.want)
		}
	}
}
