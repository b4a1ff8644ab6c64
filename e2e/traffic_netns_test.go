package e2e

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestTrafficNeedsTheRules proves with real TCP traffic what the rules are
// for. A "node" namespace whose firewall drops whatever is not part of a
// tracked connection holds the proxy's address on lo and an echo server on
// it; a "client" namespace reaches it over a veth. The client
//
//   - cannot connect while only the address is in place;
//   - connects and exchanges bytes once the sidecar has loaded its rules,
//     and conntrack in the node lists no entry for that connection while it
//     lists the control connection made at the same time to a port the
//     node's own firewall accepts, so conntrack works there and the proxy's
//     traffic really is untracked;
//   - cannot connect again after --cleanup, once the address is back.
//
// Each backend writes the node's own rules with its own programs, so the
// sidecar's rules meet a firewall in the same kernel subsystem, as on a
// node.
func TestTrafficNeedsTheRules(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "conntrack")
	for _, backend := range backends {
		for _, fam := range families {
			t.Run(backend+"/"+fam.name, func(t *testing.T) {
				t.Parallel()
				testTraffic(t, bin, backend, backend, fam)
			})
		}
	}
	// A legacy node, as kube-proxy and kubelet leave it, with the backend
	// left to detection: only rules written through legacy let traffic in,
	// since the node's DROP policy and its rules live there.
	for _, fam := range families {
		t.Run("auto-on-legacy/"+fam.name, func(t *testing.T) {
			t.Parallel()
			testTraffic(t, bin, "legacy", "auto", fam)
		})
	}
}

// testTraffic runs the traffic proof on a node whose own firewall is written
// with backend, the sidecar running with --iptables-backend=flag. With
// "auto", the node also gets kube-proxy-style rules and kubelet's hint chain
// in mangle, and the sidecar must say it chose backend because of the hint.
func testTraffic(t *testing.T, bin, backend, flag string, fam family) {
	node, client := netnstest.New(t), netnstest.New(t)
	netnstest.Veth(t, node, client, "veth-node", "veth-client")
	addVethAddr(t, node, "veth-node", fam.node)
	addVethAddr(t, client, "veth-client", fam.client)
	client.Run(t, "ip", "route", "add", netip.PrefixFrom(fam.proxy, fam.proxy.BitLen()).String(), "via", fam.node.Addr().String())

	// The node's firewall: drop by default, accept what conntrack already
	// knows, and the control port. The proxy's traffic, once untracked, is
	// never ESTABLISHED, so only the sidecar's own ACCEPT can let it in.
	ipt := fam.iptables + "-" + backend
	node.Run(t, ipt, "-P", "INPUT", "DROP")
	node.Run(t, ipt, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
	if fam.proxy.Is6() {
		// Conntrack leaves neighbour solicitations and advertisements
		// untracked (state UNTRACKED, never ESTABLISHED or RELATED), so
		// without this rule the policy drops neighbour discovery: the
		// client's dials fail with "no route to host", even to the control
		// port, for a reason other than the one under test.
		node.Run(t, ipt, "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
	}
	node.Run(t, ipt, "-A", "INPUT", "-p", "tcp", "--dport", strconv.Itoa(controlPort), "-j", "ACCEPT")
	if flag == "auto" {
		node.Run(t, ipt, "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
		node.Run(t, ipt, "-t", "nat", "-N", "KUBE-SERVICES")
		node.Run(t, ipt, "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES")
		node.Run(t, ipt, "-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES")
		node.Run(t, ipt, "-N", "KUBE-FIREWALL")
		node.Run(t, ipt, "-I", "INPUT", "-j", "KUBE-FIREWALL")
	}

	sidecar := func(args ...string) string {
		t.Helper()
		return mustOneShot(t, node, nil, bin, append([]string{"--ip-address", fam.proxy.String(), "--daemon=false", "--iptables-backend", flag}, args...)...)
	}
	proxy := netip.AddrPortFrom(fam.proxy, proxyPort)
	control := netip.AddrPortFrom(fam.node.Addr(), controlPort)

	// The address alone: the proxy can listen, but its SYN is dropped. The
	// control shows that the veth, the routes and neighbour discovery work.
	if log := sidecar(); !strings.Contains(log, `"Address is in place; rules not managed (no --setup-iptables)"`) {
		t.Errorf("without --setup-iptables the one-shot run does not say that it left the rules alone:\n%s", log)
	}
	serveEcho(t, node, proxy)
	serveEcho(t, node, control)
	mustEcho(t, client, control, "control before the rules")
	mustBeDropped(t, client, proxy)

	// With the rules the client gets through, untracked. Only conntrack
	// shows the second half: without either NOTRACK rule the client still
	// gets through (the ACCEPT takes the SYN, or the reply is picked up
	// mid-stream), but an entry is listed.
	log := sidecar("--setup-iptables")
	if !strings.Contains(log, `"Address and rules are in place"`) {
		t.Errorf("the one-shot run with --setup-iptables does not say that the address and rules are in place:\n%s", log)
	}
	if flag == "auto" {
		want := fmt.Sprintf(`"Chose iptables backend" family="%s" backend="%s" evidence="chain KUBE-IPTABLES-HINT in mangle, seen with %s-%s-save"`, fam.name, backend, fam.iptables, backend)
		if !strings.Contains(log, want) {
			t.Errorf("the sidecar's log does not name the choice and its evidence, %s; it says:\n%s", want, log)
		}
	}
	mustEcho(t, client, proxy, "through the rules")
	controlConn := mustEcho(t, client, control, "control beside the rules")
	entries := conntrackEntries(t, node, fam.conntrack)
	for _, e := range entries {
		if mentions(e, fam.proxy, proxyPort) {
			t.Errorf("conntrack tracks the proxy's traffic: %s", e.Line)
		}
	}
	if !hasConnection(entries, controlConn) {
		t.Errorf("conntrack does not list the control connection %s -> %s, so its silence about the proxy proves nothing; it lists:\n%s",
			controlConn.LocalAddr(), controlConn.RemoteAddr(), conntrackLines(entries))
	}

	// After --cleanup the rules are gone: with the address put back, the
	// SYN is dropped again while the control still gets through.
	sidecar("--cleanup", "--setup-iptables")
	sidecar()
	mustEcho(t, client, control, "control after cleanup")
	mustBeDropped(t, client, proxy)
}
