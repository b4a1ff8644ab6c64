package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// clientFamily is one address family of TestClientPaths.
type clientFamily struct {
	trafficFamily
	// clusterIP is the `kubernetes` Service's ClusterIP, which kube-proxy
	// DNATs to the proxy's address.
	clusterIP netip.Addr
	// serviceRange is routed off the node, as a node's default route does:
	// a connection to a ClusterIP needs a route before nat OUTPUT can
	// rewrite it.
	serviceRange netip.Prefix
}

var clientFamilies = []clientFamily{
	{trafficFamily: trafficFamilies[0], clusterIP: netip.MustParseAddr("100.64.0.1"), serviceRange: netip.MustParsePrefix("100.64.0.0/16")},
	{trafficFamily: trafficFamilies[1], clusterIP: netip.MustParseAddr("fd00:10:96::1"), serviceRange: netip.MustParsePrefix("fd00:10:96::/112")},
}

// kubeProxyMode is the shape of kube-proxy's DNAT of the ClusterIP.
type kubeProxyMode string

const (
	// iptablesMode: KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP in nat, loaded
	// with the sidecar's own backend.
	iptablesMode kubeProxyMode = "iptables-mode"
	// nftablesMode: a table of its own with a service-ips verdict map,
	// loaded with nft.
	nftablesMode kubeProxyMode = "nftables-mode"
)

// clientPath is one client and the address it dials.
type clientPath struct {
	fromPod     bool // else from the node itself (host network)
	toClusterIP bool // else straight to the proxy's address
}

func (p clientPath) String() string {
	from, to := "node", "proxy"
	if p.fromPod {
		from = "pod"
	}
	if p.toClusterIP {
		to = "ClusterIP"
	}
	return from + " -> " + to
}

var clientPaths = []clientPath{
	{fromPod: true}, {}, {fromPod: true, toClusterIP: true}, {toClusterIP: true},
}

// outcome is what a path does under a setup, and what conntrack must say
// about it.
type outcome int

const (
	// untracked: the echo round trip works, served by the listener on the
	// address dialled, and conntrack lists no entry for any of the
	// sidecar's addresses.
	untracked outcome = iota
	// tracked: the round trip works, served by the listener on the address
	// dialled, and conntrack lists the connection without NAT.
	tracked
	// natted: the round trip works through kube-proxy's DNAT, served by the
	// proxy's listener; conntrack lists the connection to the ClusterIP
	// with the proxy's address and port as reply source.
	natted
	// dropped: the dial times out and conntrack lists nothing for it: the
	// node's firewall dropped a packet of the handshake before conntrack
	// confirmed the connection, or the packets were untracked.
	dropped
	// unreplied: the dial times out and conntrack lists the connection as
	// SYN_SENT [UNREPLIED], reply source the proxy's address and port: the
	// broken setup's signature. The proxy answered, but its SYN-ACK left
	// untracked, with its own address as source instead of the ClusterIP,
	// and the client reset it.
	unreplied
)

func (o outcome) String() string {
	return [...]string{"ok, untracked", "ok, tracked", "ok through the DNAT, tracked", "fails, nothing in conntrack", "fails, SYN_SENT [UNREPLIED] in conntrack"}[o]
}

func (o outcome) connects() bool { return o <= natted }

// clientSetup is one way of running the sidecar, with the node's firewall
// around it, and what each path does under it.
type clientSetup struct {
	name string
	// intercept lists the ClusterIP after the proxy's address.
	intercept     bool
	setupIPTables bool
	// nodeAccepts443 adds, for this setup, a rule to the node's own
	// firewall that accepts the proxy's port.
	nodeAccepts443 bool
	// noLoopbackAccept removes, for this setup, the node's rule that
	// accepts traffic on lo.
	noLoopbackAccept bool
	want             map[clientPath]outcome
}

// clientSetups is the matrix, as measured on both backends, both families
// and both kube-proxy shapes.
var clientSetups = []clientSetup{
	{
		// Interception, node-local-dns style: the ClusterIP is on the node
		// with the five rules, so NOTRACK sees the pre-DNAT address and
		// kube-proxy's nat rules never apply.
		name: "a-interception", intercept: true, setupIPTables: true,
		want: map[clientPath]outcome{
			{fromPod: true}: untracked, {}: untracked,
			{fromPod: true, toClusterIP: true}: untracked, {toClusterIP: true}: untracked,
		},
	},
	{
		// Interception on a node whose firewall does not accept lo: the
		// rules accept the server's side of a connection (to the address
		// and port, from the address and port) and untrack both
		// directions, so the reply to a client on the node itself, to the
		// client's ephemeral port and never ESTABLISHED, meets the INPUT
		// policy and is dropped. Pods are unaffected.
		name: "a-interception-node-drops-lo", intercept: true, setupIPTables: true, noLoopbackAccept: true,
		want: map[clientPath]outcome{
			{fromPod: true}: untracked, {}: dropped,
			{fromPod: true, toClusterIP: true}: untracked, {toClusterIP: true}: dropped,
		},
	},
	{
		// The proxy's address only, with the rules: the rules match the
		// post-DNAT address, so a DNATed connection's reply leaves
		// untracked and un-NATed.
		name: "b-proxy-address-only", setupIPTables: true,
		want: map[clientPath]outcome{
			{fromPod: true}: untracked, {}: untracked,
			{fromPod: true, toClusterIP: true}: unreplied, {toClusterIP: true}: unreplied,
		},
	},
	{
		// No rules: the node's own firewall decides. Its INPUT policy is
		// DROP, so a pod's SYN to the proxy, DNATed or not, is dropped
		// (before conntrack confirms the connection, so nothing is
		// listed). The node's own connections come in on lo, which the
		// node accepts. Without --setup-iptables the node's firewall must
		// accept the proxy's port itself: the next setup.
		name: "c-no-rules",
		want: map[clientPath]outcome{
			{fromPod: true}: dropped, {}: tracked,
			{fromPod: true, toClusterIP: true}: dropped, {toClusterIP: true}: natted,
		},
	},
	{
		// No rules, and the node's firewall accepts the proxy's port:
		// every path works, tracked, the ClusterIP through kube-proxy's
		// DNAT as without the sidecar.
		name: "c-no-rules-node-accepts-443", nodeAccepts443: true,
		want: map[clientPath]outcome{
			{fromPod: true}: tracked, {}: tracked,
			{fromPod: true, toClusterIP: true}: natted, {toClusterIP: true}: natted,
		},
	},
}

// sidecarArgs is the one-shot command line of s.
func (s clientSetup) sidecarArgs(fam clientFamily, backend string) []string {
	addrs := fam.proxy.String()
	if s.intercept {
		addrs += "," + fam.clusterIP.String()
	}
	args := []string{"--ip-address", addrs, "--daemon=false", "--iptables-backend", backend}
	if s.setupIPTables {
		args = append(args, "--setup-iptables")
	}
	return args
}

// TestClientPaths proves with real TCP which clients reach the proxy under
// each setup of the sidecar, on a node where kube-proxy DNATs the
// `kubernetes` Service's ClusterIP to the proxy's address (kube-apiserver
// advertising that address). A "node" namespace holds the sidecar, a
// firewall whose INPUT policy is DROP, kube-proxy-shaped DNAT of the
// ClusterIP:443 to the proxy's address:443 and echo servers on both (a
// proxy listens on every address it serves); a "pod" namespace reaches it
// over a veth. Clients in the pod and on the node dial the proxy's address
// and the ClusterIP, and each setup asserts exactly which connect, which
// listener served them, and what conntrack lists: see clientSetups.
func TestClientPaths(t *testing.T) {
	netnstest.Require(t)
	netnstest.RequireBinaries(t,
		"iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy",
		"iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore",
		"nft", "conntrack")
	bin := buildSidecar(t)
	for _, backend := range []string{"nft", "legacy"} {
		for _, fam := range clientFamilies {
			for _, mode := range []kubeProxyMode{iptablesMode, nftablesMode} {
				t.Run(backend+"/"+fam.name+"/"+string(mode), func(t *testing.T) {
					t.Parallel()
					testClientPaths(t, bin, backend, fam, mode)
				})
			}
		}
	}
}

// newClientNode returns a node and a pod namespace joined by veth, the
// node's firewall dropping by default (see below) and kube-proxy's DNAT of
// fam.clusterIP:443 to the proxy address in mode's shape loaded.
func newClientNode(t *testing.T, backend string, fam clientFamily, mode kubeProxyMode) (node, pod *netnstest.NS) {
	t.Helper()
	node, pod = netnstest.New(t), netnstest.New(t)
	netnstest.Veth(t, node, pod, "veth-node", "veth-pod")
	addVethAddr(t, node, "veth-node", fam.node)
	addVethAddr(t, pod, "veth-pod", fam.client)
	pod.Run(t, "ip", "route", "add", "default", "via", fam.node.Addr().String())
	node.Run(t, "ip", "route", "add", fam.serviceRange.String(), "via", fam.client.Addr().String())

	// The node's firewall: drop by default; accept what conntrack knows,
	// loopback (as distributions' firewalls do), neighbour discovery
	// (IPv6: conntrack leaves it untracked, see testTraffic) and the
	// control port.
	ipt := fam.iptables + "-" + backend
	loopback := []string{"INPUT", "-i", "lo", "-j", "ACCEPT"}
	node.Run(t, ipt, "-P", "INPUT", "DROP")
	node.Run(t, ipt, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
	node.Run(t, ipt, append([]string{"-A"}, loopback...)...)
	if fam.proxy.Is6() {
		node.Run(t, ipt, "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
	}
	node.Run(t, ipt, "-A", "INPUT", "-p", "tcp", "--dport", strconv.Itoa(controlPort), "-j", "ACCEPT")
	loadKubeProxy(t, node, backend, fam, mode)
	return node, pod
}

func testClientPaths(t *testing.T, bin, backend string, fam clientFamily, mode kubeProxyMode) {
	node, pod := newClientNode(t, backend, fam, mode)
	ipt := fam.iptables + "-" + backend
	loopback := []string{"INPUT", "-i", "lo", "-j", "ACCEPT"}
	accept443 := []string{"INPUT", "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(proxyPort), "-j", "ACCEPT"}

	proxy := netip.AddrPortFrom(fam.proxy, proxyPort)
	clusterIP := netip.AddrPortFrom(fam.clusterIP, proxyPort)
	control := netip.AddrPortFrom(fam.node.Addr(), controlPort)
	servers := map[netip.AddrPort]*echoServer{
		proxy:     serveEcho(t, node, proxy),
		clusterIP: serveEcho(t, node, clusterIP),
	}
	listenEcho(t, node, control)

	// Setups that run the sidecar the same way follow each other, and share
	// one run of it; before the next way, --cleanup removes what the last
	// one put in place.
	var last []string
	for _, s := range clientSetups {
		args := s.sidecarArgs(fam, backend)
		ok := t.Run(s.name, func(t *testing.T) {
			if !slices.Equal(args, last) {
				if last != nil {
					runSidecar(t, node, bin, append(last, "--cleanup")...)
				}
				last = nil
				runSidecar(t, node, bin, args...)
				last = args
			}
			if s.nodeAccepts443 {
				node.Run(t, ipt, append([]string{"-I"}, accept443...)...)
			}
			if s.noLoopbackAccept {
				node.Run(t, ipt, append([]string{"-D"}, loopback...)...)
			}
			node.Run(t, "conntrack", "-F")

			// The control is tracked under every setup: it shows that the
			// veth, the routes and conntrack work, so that conntrack's
			// silence about an address means something.
			controlConn := mustEcho(t, pod, control, "control")

			// Every path at once: the ones that fail take a whole dial
			// timeout each.
			results := make(map[clientPath]probeResult)
			var mu sync.Mutex
			var wg sync.WaitGroup
			for _, p := range clientPaths {
				from, target := node, proxy
				if p.fromPod {
					from = pod
				}
				if p.toClusterIP {
					target = clusterIP
				}
				timeout := echoTimeout
				if !s.want[p].connects() {
					timeout = droppedDialTimeout
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := probe(t, from, target, timeout)
					mu.Lock()
					results[p] = r
					mu.Unlock()
				}()
			}
			wg.Wait()

			entries := conntrackEntries(t, node, fam.conntrack)
			if !hasConnection(entries, controlConn) {
				t.Errorf("conntrack does not list the control connection %s -> %s, so what it says about the proxy proves nothing; it lists:\n%s",
					controlConn.LocalAddr(), controlConn.RemoteAddr(), conntrackLines(entries))
			}
			for _, p := range clientPaths {
				checkPath(t, p, s.want[p], results[p], entries, servers, proxy)
			}
			if s.intercept {
				for _, e := range entries {
					if e.mentions(fam.proxy, proxyPort) || e.mentions(fam.clusterIP, proxyPort) {
						t.Errorf("conntrack tracks traffic of an intercepted address: %s", e.line)
					}
				}
			}

			if s.noLoopbackAccept {
				node.Run(t, ipt, append([]string{"-A"}, loopback...)...)
			}
			if s.nodeAccepts443 {
				node.Run(t, ipt, append([]string{"-D"}, accept443...)...)
			}
		})
		if !ok {
			return // the next setup would start from an unknown state
		}
	}
}

// checkPath asserts that path p, whose probe gave r, did what want says,
// with entries as conntrack listed them after every probe of the setup.
func checkPath(t *testing.T, p clientPath, want outcome, r probeResult, entries []ctEntry, servers map[netip.AddrPort]*echoServer, proxy netip.AddrPort) {
	t.Helper()
	if want.connects() != (r.err == nil) {
		if r.err != nil {
			t.Errorf("%s %s: %v; want %s", p, r.target, r.err, want)
		} else {
			t.Errorf("%s %s: connected from %s; want %s", p, r.target, r.local, want)
		}
		return
	}
	if r.err != nil && !r.timeout {
		t.Errorf("%s %s: %v; want a timeout (%s)", p, r.target, r.err, want)
		return
	}
	if want.connects() {
		servedBy := r.target
		if want == natted {
			servedBy = proxy
		}
		for addr, srv := range servers {
			if got := srv.served(r.local); got != (addr == servedBy) {
				t.Errorf("%s %s from %s: the listener on %s served it: %t, want %t", p, r.target, r.local, addr, got, addr == servedBy)
			}
		}
	}
	var mine []ctEntry
	for _, e := range entries {
		if e.origin() == (ctTuple{r.local.Addr(), r.target}) && (r.local.Port() == 0 || e.first("sport") == strconv.Itoa(int(r.local.Port()))) {
			mine = append(mine, e)
		}
	}
	switch want {
	case untracked, dropped:
		for _, e := range mine {
			t.Errorf("%s %s from %s (%s): conntrack lists it: %s", p, r.target, r.local, want, e.line)
		}
		return
	}
	if len(mine) != 1 {
		t.Errorf("%s %s from %s (%s): conntrack lists %d entries for it, want 1:\n%s", p, r.target, r.local, want, len(mine), conntrackLines(mine))
		return
	}
	e := mine[0]
	replySource := r.target
	if want != tracked {
		replySource = proxy
	}
	if got := e.replySource(); got != replySource {
		t.Errorf("%s %s (%s): conntrack's reply source is %s, want %s: %s", p, r.target, want, got, replySource, e.line)
	}
	if unrepl := e.has("[UNREPLIED]"); unrepl != (want == unreplied) {
		t.Errorf("%s %s (%s): conntrack lists it [UNREPLIED]: %t, want %t: %s", p, r.target, want, unrepl, want == unreplied, e.line)
	}
	if want == unreplied && !e.has("SYN_SENT") {
		t.Errorf("%s %s (%s): conntrack lists it in another state than SYN_SENT: %s", p, r.target, want, e.line)
	}
}

// ctTuple is one direction of a conntrack entry: source address,
// destination address and port.
type ctTuple struct {
	src netip.Addr
	dst netip.AddrPort
}

// origin is e's original direction.
func (e ctEntry) origin() ctTuple {
	src, _ := netip.ParseAddr(e.nth("src", 0))
	dst, _ := netip.ParseAddr(e.nth("dst", 0))
	return ctTuple{src, netip.AddrPortFrom(dst, conntrackPort(e.nth("dport", 0)))}
}

// replySource is the source address and port of e's reply direction.
func (e ctEntry) replySource() netip.AddrPort {
	src, _ := netip.ParseAddr(e.nth("src", 1))
	return netip.AddrPortFrom(src, conntrackPort(e.nth("sport", 1)))
}

// nth returns the value of the n-th (from 0) field named key, or "".
func (e ctEntry) nth(key string, n int) string {
	for _, f := range e.fields {
		if f[0] == key {
			if n == 0 {
				return f[1]
			}
			n--
		}
	}
	return ""
}

// has reports whether e's line holds word as a field of its own, such as a
// state (SYN_SENT) or a flag ([UNREPLIED]).
func (e ctEntry) has(word string) bool {
	return slices.Contains(strings.Fields(e.line), word)
}

// probeResult is one dial and echo round trip.
type probeResult struct {
	target netip.AddrPort
	// local is the client's end of the connection; when it never
	// connected, the source address the node's routing picks for target,
	// with port 0.
	local   netip.AddrPort
	err     error
	timeout bool
}

// probe dials target from inside ns and exchanges a message with the echo
// server there, then closes the connection. It may run in any goroutine:
// it reports instead of failing the test.
func probe(t *testing.T, ns *netnstest.NS, target netip.AddrPort, timeout time.Duration) probeResult {
	r := probeResult{target: target}
	c, err := dialFrom(t, ns, target, timeout)
	if err != nil {
		r.err = err
		var ne net.Error
		r.timeout = errors.As(err, &ne) && ne.Timeout()
		r.local = netip.AddrPortFrom(sourceFor(t, ns, target), 0)
		return r
	}
	defer c.Close()
	r.local = tcpAddrPort(c.LocalAddr())
	if err := c.SetDeadline(time.Now().Add(echoTimeout)); err != nil {
		r.err = err
		return r
	}
	msg := []byte("echo via " + target.String())
	if _, err := c.Write(msg); err != nil {
		r.err = fmt.Errorf("writing: %w", err)
		return r
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		r.err = fmt.Errorf("reading back: %w (got %q)", err, got)
		return r
	}
	if string(got) != string(msg) {
		r.err = fmt.Errorf("echoed %q, want %q", got, msg)
	}
	return r
}

// sourceFor is the source address ns's routing picks for a connection to
// target, found by connecting a UDP socket (which sends nothing). A TCP
// connection picks the same, before nat OUTPUT can rewrite its destination.
func sourceFor(t *testing.T, ns *netnstest.NS, target netip.AddrPort) netip.Addr {
	var src netip.Addr
	err := ns.Do(t, func() error {
		c, err := net.Dial("udp", target.String())
		if err != nil {
			return err
		}
		defer c.Close()
		src = c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
		return nil
	})
	if err != nil {
		return netip.Addr{}
	}
	return src
}

// runSidecar runs the sidecar once in ns and fails the test if it fails.
func runSidecar(t *testing.T, ns *netnstest.NS, bin string, args ...string) {
	t.Helper()
	cmd := ns.Command(bin, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
}

// loadKubeProxy loads, in ns, kube-proxy's rules for a ClusterIP Service
// fam.clusterIP:443 with one endpoint, the proxy's address:443, in the
// shape mode gives. iptables mode is loaded with backend's restore program.
func loadKubeProxy(t *testing.T, ns *netnstest.NS, backend string, fam clientFamily, mode kubeProxyMode) {
	t.Helper()
	dir := t.TempDir()
	switch mode {
	case iptablesMode:
		path := filepath.Join(dir, "kube-proxy.rules")
		writeFile(t, path, kubeProxyIPTables(fam))
		ns.Run(t, fam.iptables+"-"+backend+"-restore", "--noflush", path)
	case nftablesMode:
		path := filepath.Join(dir, "kube-proxy.nft")
		writeFile(t, path, kubeProxyNFTables(fam))
		ns.Run(t, "nft", "-f", path)
	default:
		t.Fatalf("unknown kube-proxy mode %q", mode)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// kubeProxyIPTables is what kube-proxy in iptables mode writes into nat for
// the `kubernetes` Service with one endpoint, as iptables-restore input.
func kubeProxyIPTables(fam clientFamily) string {
	bits := strconv.Itoa(fam.proxy.BitLen())
	endpoint := netip.AddrPortFrom(fam.proxy, proxyPort).String()
	const svc, sep = "KUBE-SVC-NPX46M4PTMTKRN6Y", "KUBE-SEP-ZTTJ5EA4YGZXTPDU"
	return strings.Join([]string{
		"*nat",
		":KUBE-SERVICES - [0:0]",
		":KUBE-POSTROUTING - [0:0]",
		":KUBE-MARK-MASQ - [0:0]",
		":" + svc + " - [0:0]",
		":" + sep + " - [0:0]",
		`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`,
		`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000`,
		`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN`,
		`-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0`,
		`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`,
		`-A KUBE-SERVICES -d ` + fam.clusterIP.String() + "/" + bits + ` -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j ` + svc,
		`-A ` + svc + ` -m comment --comment "default/kubernetes:https -> ` + endpoint + `" -j ` + sep,
		`-A ` + sep + ` -s ` + fam.proxy.String() + "/" + bits + ` -m comment --comment "default/kubernetes:https" -j KUBE-MARK-MASQ`,
		`-A ` + sep + ` -p tcp -m comment --comment "default/kubernetes:https" -m tcp -j DNAT --to-destination ` + endpoint,
		"COMMIT",
		"",
	}, "\n")
}

// kubeProxyNFTables is what kube-proxy in nftables mode writes for the
// `kubernetes` Service with one endpoint, as nft -f input: a table of its
// own, a verdict map from ClusterIP, protocol and port to the Service's
// chain, and an endpoint chain that DNATs.
func kubeProxyNFTables(fam clientFamily) string {
	table, addrType, ip := "ip", "ipv4_addr", "ip"
	if fam.proxy.Is6() {
		table, addrType, ip = "ip6", "ipv6_addr", "ip6"
	}
	endpoint := netip.AddrPortFrom(fam.proxy, proxyPort).String()
	svc := "service-2QRHZV4L-default/kubernetes/tcp/https"
	ep := "endpoint-5OJB2KTY-default/kubernetes/tcp/https__" + strings.NewReplacer(":", ".", "[", "", "]", "").Replace(endpoint)
	return fmt.Sprintf(`table %[1]s kube-proxy {
	comment "rules for kube-proxy"
	chain mark-for-masquerade {
		meta mark set meta mark | 0x4000
	}
	chain masquerading {
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}
	map service-ips {
		type %[2]s . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
	}
	chain services {
		%[3]s daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}
	chain %[7]s {
		%[3]s saddr %[5]s jump mark-for-masquerade
		meta l4proto tcp dnat to %[6]s
	}
	chain %[8]s {
		numgen random mod 1 vmap { 0 : goto %[7]s }
	}
}
add element %[1]s kube-proxy service-ips { %[4]s . tcp . 443 : goto %[8]s }
`, table, addrType, ip, fam.clusterIP, fam.proxy, endpoint, ep, svc)
}

// echoServer is an echo server that remembers which clients it served.
type echoServer struct {
	mu    sync.Mutex
	peers map[netip.AddrPort]bool
}

// serveEcho serves, inside ns, an echo server on addr until the test ends.
// It binds with IP_FREEBIND, as a proxy does that must listen on an
// address before the node has it: the ClusterIP is on the node only while
// it is intercepted.
func serveEcho(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) *echoServer {
	t.Helper()
	lc := net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if addr.Addr().Is4() {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var ln net.Listener
	if err := ns.Do(t, func() error {
		var err error
		ln, err = lc.Listen(t.Context(), "tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns.Name, err)
	}
	s := &echoServer{peers: make(map[netip.AddrPort]bool)}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.peers[tcpAddrPort(c.RemoteAddr())] = true
			s.mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				// Every client closes after its echo; the deadline ends one
				// whose FIN never arrives.
				_ = c.SetDeadline(time.Now().Add(2 * echoTimeout))
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return s
}

// served reports whether s accepted a connection from peer.
func (s *echoServer) served(peer netip.AddrPort) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peers[peer]
}
