package apply

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/conntrack"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/kubeproxy"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// dnatFamily is one address family of TestDNATCheckNetns.
type dnatFamily struct {
	name string
	// proxy is our address, on the node's lo; clusterIP is the
	// kubernetes Service's, DNATed to proxy by kube-proxy's rules.
	proxy, clusterIP netip.Addr
	// node and pod are the two ends of the veth between the namespaces.
	node, pod netip.Prefix
	// conntrack is the family as `conntrack -f` names it.
	conntrack string
}

var dnatFamilies = []dnatFamily{
	{
		name:      "IPv4",
		proxy:     netip.MustParseAddr("10.96.0.2"),
		clusterIP: netip.MustParseAddr("100.64.0.1"),
		node:      netip.MustParsePrefix("192.0.2.1/24"),
		pod:       netip.MustParsePrefix("192.0.2.2/24"),
		conntrack: "ipv4",
	},
	{
		name:      "IPv6",
		proxy:     netip.MustParseAddr("fd00::2"),
		clusterIP: netip.MustParseAddr("fd00::100:1"),
		node:      netip.MustParsePrefix("2001:db8::1/64"),
		pod:       netip.MustParsePrefix("2001:db8::2/64"),
		conntrack: "ipv6",
	},
}

const (
	// dnatPort is the port of the Service and of our address.
	dnatPort = 443
	// brokenDialTimeout ends a dial that cannot succeed: the pod resets
	// the SYN-ACK it gets from our address and retransmits its SYN.
	brokenDialTimeout = time.Second
	// workingTimeout bounds a dial and echo that must succeed.
	workingTimeout = 5 * time.Second
)

// dnatNode is a node namespace whose nat table DNATs the kubernetes
// Service to our address, where a server listens, and a pod namespace
// beside it, joined by a veth.
type dnatNode struct {
	node, pod *netnstest.NS
	fam       dnatFamily
	backend   Backend
}

func newDNATNode(t testing.TB, b Backend, fam dnatFamily) *dnatNode {
	t.Helper()
	n := &dnatNode{node: netnstest.New(t), pod: netnstest.New(t), fam: fam, backend: b}
	netnstest.Veth(t, n.node, n.pod, "veth-node", "veth-pod")
	n.addAddr(t, n.node, fam.node, "veth-node")
	n.addAddr(t, n.pod, fam.pod, "veth-pod")
	n.pod.Run(t, "ip", "route", "add", "default", "via", fam.node.Addr().String())
	n.addAddr(t, n.node, netip.PrefixFrom(fam.proxy, fam.proxy.BitLen()), "lo")
	listenEchoIn(t, n.node, netip.AddrPortFrom(fam.proxy, dnatPort))

	// kube-proxy's shape: PREROUTING and OUTPUT jump to KUBE-SERVICES,
	// which sends the Service to its KUBE-SVC chain, which picks a
	// KUBE-SEP chain, which DNATs to the endpoint: our address.
	payload := kubeproxy.KubernetesService(netip.AddrPortFrom(fam.clusterIP, dnatPort), netip.AddrPortFrom(fam.proxy, dnatPort))
	cmd := n.node.Command(program(b, render.FamilyOf(fam.proxy), backend.Restore), "--noflush")
	cmd.Stdin = strings.NewReader(payload)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("loading kube-proxy's rules: %v: %s", err, out)
	}
	return n
}

func (n *dnatNode) addAddr(t testing.TB, ns *netnstest.NS, p netip.Prefix, dev string) {
	t.Helper()
	args := []string{"addr", "add", p.String(), "dev", dev}
	if p.Addr().Is6() {
		args = append(args, "nodad")
	}
	ns.Run(t, "ip", args...)
}

func (n *dnatNode) family() render.Family { return render.FamilyOf(n.fam.proxy) }

// ipt runs the node's iptables of the test's backend and family.
func (n *dnatNode) ipt(t testing.TB, args ...string) {
	t.Helper()
	n.node.Run(t, program(n.backend, n.family(), backend.IPTables), args...)
}

// loadRules loads the sidecar's rendered rules for our address with
// iptables-restore --noflush, as the sidecar does.
func (n *dnatNode) loadRules(t testing.TB) {
	t.Helper()
	rs, err := render.RenderFamily([]netip.Addr{n.fam.proxy}, dnatPort)
	if err != nil {
		t.Fatal(err)
	}
	cmd := n.node.Command(program(n.backend, rs.Family, backend.Restore), "--noflush")
	cmd.Stdin = bytes.NewReader(rs.Payload())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("loading the rules for %s: %v: %s", n.fam.proxy, err, out)
	}
}

// addRulesFor appends the five rules rendered for addr to the chains
// loadRules created, as a sidecar that intercepts addr too would have
// them.
func (n *dnatNode) addRulesFor(t testing.TB, addr netip.Addr) {
	t.Helper()
	rs, err := render.RenderFamily([]netip.Addr{addr}, dnatPort)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			for _, r := range c.Rules {
				n.ipt(t, append([]string{"-t", tb.Name}, strings.Fields(r)...)...)
			}
		}
	}
}

// dnatService is the Service's address and port, as a pod dials it.
func (n *dnatNode) dnatService() netip.AddrPort { return netip.AddrPortFrom(n.fam.clusterIP, dnatPort) }

func (n *dnatNode) ours() netip.AddrPort { return netip.AddrPortFrom(n.fam.proxy, dnatPort) }

// entries lists, with the in-process reader, the node's conntrack entries
// whose reply comes from one of addrs on our port, answered or not.
func (n *dnatNode) entries(t testing.TB, addrs ...netip.Addr) []conntrack.Entry {
	t.Helper()
	var out []conntrack.Entry
	f := conntrack.Filter{ReplySrc: addrs, ReplySrcPort: dnatPort, Proto: unix.IPPROTO_TCP}
	if _, err := conntrack.NewTable(n.node.NetNS(t)).Dump(context.Background(), f, func(e conntrack.Entry) error {
		out = append(out, e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestDNATCheckNetns proves DNATCheck against the real kernel, with real
// TCP from a pod namespace through kube-proxy-shaped DNAT rules, on both
// iptables backends and both families:
//
//   - broken: the Service is DNATed to our address while our rules untrack
//     its replies; the pod cannot connect, and Check reports exactly that
//     Service and our address, once;
//   - healthy: without our rules the DNATed connection works, and Check
//     finds nothing though conntrack lists the connection;
//   - direct: with our rules a pod reaches our address itself, untracked,
//     and Check finds nothing;
//   - interception: with the Service's own address on the node and the
//     rules for it too, the pod reaches it untracked, before any DNAT:
//     Check finds nothing and conntrack holds no entry for it.
func TestDNATCheckNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy",
		"iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore", "conntrack")
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		for _, fam := range dnatFamilies {
			t.Run(fmt.Sprintf("%s/%s", b, fam.name), func(t *testing.T) {
				t.Parallel()
				t.Run("broken", func(t *testing.T) { testDNATBroken(t, b, fam) })
				t.Run("healthy", func(t *testing.T) { testDNATHealthy(t, b, fam) })
				t.Run("direct", func(t *testing.T) { testDNATDirect(t, b, fam) })
				t.Run("interception", func(t *testing.T) { testDNATInterception(t, b, fam) })
			})
		}
	}
}

func testDNATBroken(t *testing.T, b Backend, fam dnatFamily) {
	n := newDNATNode(t, b, fam)
	n.loadRules(t)
	ctx := context.Background()
	check := NewDNATCheckAt(n.node.NetNS(t), []netip.Addr{fam.proxy}, dnatPort)
	if got, err := check.Check(ctx); err != nil || len(got) != 0 {
		t.Fatalf("before any connection: Check = %v, %v; want nothing", got, err)
	}

	client := netip.AddrPortFrom(fam.pod.Addr(), 40001)
	mustNotConnect(t, n.pod, client, n.dnatService())
	want := []DNATFinding{{Original: n.dnatService(), To: n.ours(), New: 1, Example: client}}
	got, err := check.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
		t.Fatalf("Check after one broken connection (-want +got):\n%s\nconntrack -L:\n%s", diff, n.node.Run(t, "conntrack", "-L", "-f", fam.conntrack))
	}
	if err := check.Unfiltered(); err != nil {
		t.Errorf("this kernel filters conntrack dumps, yet: %v", err)
	}

	// The same connection is not new the second time.
	if got, err := check.Check(ctx); err != nil || len(got) != 0 {
		t.Fatalf("second Check = %v, %v; want nothing new", got, err)
	}
	// The in-process reader lists exactly what conntrack -L does.
	compareWithConntrackTool(t, n)

	// Another connection is new, while the first is still listed.
	second := netip.AddrPortFrom(fam.pod.Addr(), 40002)
	mustNotConnect(t, n.pod, second, n.dnatService())
	got, err = check.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want[0].Example = second
	if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
		t.Fatalf("Check after a second broken connection (-want +got):\n%s", diff)
	}
	if all := n.entries(t, fam.proxy); len(all) != 2 {
		t.Errorf("conntrack lists %d entries from our address, want both connections: %v", len(all), all)
	}
}

func testDNATHealthy(t *testing.T, b Backend, fam dnatFamily) {
	n := newDNATNode(t, b, fam)
	check := NewDNATCheckAt(n.node.NetNS(t), []netip.Addr{fam.proxy}, dnatPort)
	mustEchoFrom(t, n.pod, n.dnatService())
	if got, err := check.Check(context.Background()); err != nil || len(got) != 0 {
		t.Fatalf("Check = %v, %v; want nothing", got, err)
	}
	// Check did not miss it: the DNATed connection is listed, answered.
	entries := n.entries(t, fam.proxy)
	if len(entries) != 1 || entries[0].Orig.Dst != n.dnatService() || !entries[0].SeenReply() {
		t.Errorf("conntrack entries from our address: %+v; want the one DNATed connection, answered", entries)
	}
}

func testDNATDirect(t *testing.T, b Backend, fam dnatFamily) {
	n := newDNATNode(t, b, fam)
	n.loadRules(t)
	check := NewDNATCheckAt(n.node.NetNS(t), []netip.Addr{fam.proxy}, dnatPort)
	mustEchoFrom(t, n.pod, n.ours())
	if got, err := check.Check(context.Background()); err != nil || len(got) != 0 {
		t.Fatalf("Check = %v, %v; want nothing", got, err)
	}
	if entries := n.entries(t, fam.proxy); len(entries) != 0 {
		t.Errorf("conntrack tracks the direct connection: %+v", entries)
	}
}

func testDNATInterception(t *testing.T, b Backend, fam dnatFamily) {
	n := newDNATNode(t, b, fam)
	n.addAddr(t, n.node, netip.PrefixFrom(fam.clusterIP, fam.clusterIP.BitLen()), "lo")
	listenEchoIn(t, n.node, n.dnatService())
	n.loadRules(t)
	n.addRulesFor(t, fam.clusterIP)
	check := NewDNATCheckAt(n.node.NetNS(t), []netip.Addr{fam.proxy, fam.clusterIP}, dnatPort)
	mustEchoFrom(t, n.pod, n.dnatService())
	if got, err := check.Check(context.Background()); err != nil || len(got) != 0 {
		t.Fatalf("Check = %v, %v; want nothing", got, err)
	}
	if entries := n.entries(t, fam.proxy, fam.clusterIP); len(entries) != 0 {
		t.Errorf("conntrack tracks the intercepted connection: %+v", entries)
	}
	if out := n.node.Run(t, "conntrack", "-L", "-f", fam.conntrack, "-d", fam.clusterIP.String()); strings.TrimSpace(out) != "" {
		t.Errorf("conntrack -L lists connections to the Service:\n%s", out)
	}
}

// compareWithConntrackTool requires the in-process reader to list the
// entries from our address that conntrack -L prints, field for field.
func compareWithConntrackTool(t *testing.T, n *dnatNode) {
	t.Helper()
	var want []netnstest.ConntrackEntry
	for _, e := range n.node.Conntrack(t, n.fam.conntrack) {
		if e.ReplySrc == n.ours() && e.Proto == "tcp" {
			e.Line = ""
			want = append(want, e)
		}
	}
	if len(want) == 0 {
		t.Fatal("conntrack -L lists nothing from our address")
	}
	var got []netnstest.ConntrackEntry
	for _, e := range n.entries(t, n.fam.proxy) {
		got = append(got, netnstest.ConntrackEntry{
			Proto: "tcp", ProtoNum: e.Orig.Proto, State: conntrack.TCPStateName(e.TCPState),
			OrigSrc: e.Orig.Src, OrigDst: e.Orig.Dst, ReplySrc: e.Reply.Src, ReplyDst: e.Reply.Dst,
			Unreplied: !e.SeenReply(), ID: e.ID,
		})
	}
	byID := func(a, b netnstest.ConntrackEntry) int { return int(a.ID) - int(b.ID) }
	slices.SortFunc(want, byID)
	slices.SortFunc(got, byID)
	if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
		t.Errorf("in-process reader against conntrack -L (-tool +reader):\n%s", diff)
	}
}

// listenEchoIn serves, inside ns, an echo server on addr until the test
// ends.
func listenEchoIn(t testing.TB, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listening on %s: %v", addr, err)
	}
	netnstest.Serve(t, ln, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(workingTimeout))
		_, _ = io.Copy(c, c)
	})
}

// mustEchoFrom connects from inside ns to the echo server at addr and
// requires its bytes back.
func mustEchoFrom(t testing.TB, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	var c net.Conn
	if err := ns.Do(t, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: workingTimeout}).Dial("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(workingTimeout))
	msg := []byte("hello " + addr.String())
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("writing to %s: %v", addr, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("reading back from %s: %q, %v", addr, got, err)
	}
}

// mustNotConnect dials addr from inside ns, from the address and port
// from, and requires the dial to time out, as it does when the SYN-ACK
// that comes back is not the one the client waits for.
func mustNotConnect(t *testing.T, ns *netnstest.NS, from, addr netip.AddrPort) {
	t.Helper()
	err := ns.Do(t, func() error {
		d := net.Dialer{Timeout: brokenDialTimeout, LocalAddr: net.TCPAddrFromAddrPort(from)}
		c, err := d.Dial("tcp", addr.String())
		if err == nil {
			c.Close()
		}
		return err
	})
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("dialing %s from %s: %v; want a timeout", addr, from, err)
	}
}
