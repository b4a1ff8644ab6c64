package e2e

import (
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
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
func (s clientSetup) sidecarArgs(fam family, backend string) []string {
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
	bin := e2eTest(t,
		"iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy",
		"iptables-nft-restore", "iptables-legacy-restore", "ip6tables-nft-restore", "ip6tables-legacy-restore",
		"nft", "conntrack")
	for _, backend := range backends {
		for _, fam := range families {
			for _, mode := range []kubeProxyMode{iptablesMode, nftablesMode} {
				t.Run(backend+"/"+fam.name+"/"+string(mode), func(t *testing.T) {
					t.Parallel()
					testClientPaths(t, bin, backend, fam, mode)
				})
			}
		}
	}
}

func testClientPaths(t *testing.T, bin, backend string, fam family, mode kubeProxyMode) {
	node, pod := newClientNode(t, backend, fam, mode)
	ipt := fam.iptables + "-" + backend
	loopback := loopbackAccept
	accept443 := []string{"INPUT", "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(proxyPort), "-j", "ACCEPT"}

	proxy := netip.AddrPortFrom(fam.proxy, proxyPort)
	clusterIP := netip.AddrPortFrom(fam.clusterIP, proxyPort)
	control := netip.AddrPortFrom(fam.node.Addr(), controlPort)
	servers := map[netip.AddrPort]*echoServer{
		proxy:     serveEcho(t, node, proxy),
		clusterIP: serveEcho(t, node, clusterIP),
	}
	serveEcho(t, node, control)

	// Setups that run the sidecar the same way follow each other, and share
	// one run of it; before the next way, --cleanup removes what the last
	// one put in place.
	var last []string
	for _, s := range clientSetups {
		args := s.sidecarArgs(fam, backend)
		ok := t.Run(s.name, func(t *testing.T) {
			if !slices.Equal(args, last) {
				if last != nil {
					mustOneShot(t, node, nil, bin, append(last, "--cleanup")...)
				}
				last = nil
				mustOneShot(t, node, nil, bin, args...)
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
					if mentions(e, fam.proxy, proxyPort) || mentions(e, fam.clusterIP, proxyPort) {
						t.Errorf("conntrack tracks traffic of an intercepted address: %s", e.Line)
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
func checkPath(t *testing.T, p clientPath, want outcome, r probeResult, entries []netnstest.ConntrackEntry, servers map[netip.AddrPort]*echoServer, proxy netip.AddrPort) {
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
	var mine []netnstest.ConntrackEntry
	for _, e := range entries {
		if e.OrigSrc.Addr() == r.local.Addr() && e.OrigDst == r.target && (r.local.Port() == 0 || e.OrigSrc.Port() == r.local.Port()) {
			mine = append(mine, e)
		}
	}
	switch want {
	case untracked, dropped:
		for _, e := range mine {
			t.Errorf("%s %s from %s (%s): conntrack lists it: %s", p, r.target, r.local, want, e.Line)
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
	if got := e.ReplySrc; got != replySource {
		t.Errorf("%s %s (%s): conntrack's reply source is %s, want %s: %s", p, r.target, want, got, replySource, e.Line)
	}
	if e.Unreplied != (want == unreplied) {
		t.Errorf("%s %s (%s): conntrack lists it [UNREPLIED]: %t, want %t: %s", p, r.target, want, e.Unreplied, want == unreplied, e.Line)
	}
	if want == unreplied && e.State != "SYN_SENT" {
		t.Errorf("%s %s (%s): conntrack lists it in another state than SYN_SENT: %s", p, r.target, want, e.Line)
	}
}
