package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// trafficFamily is one address family of TestTrafficNeedsTheRules.
type trafficFamily struct {
	name string
	// proxy is the sidecar's --ip-address, kept on the node's lo.
	proxy netip.Addr
	// node and client are the two ends of the veth between the namespaces.
	node, client netip.Prefix
	// iptables is the program's name without the backend: "iptables" or
	// "ip6tables".
	iptables string
	// conntrack is the family as `conntrack -f` names it.
	conntrack string
}

var trafficFamilies = []trafficFamily{
	{
		name:      "IPv4",
		proxy:     netip.MustParseAddr("10.96.0.2"),
		node:      netip.MustParsePrefix("192.0.2.1/24"),
		client:    netip.MustParsePrefix("192.0.2.2/24"),
		iptables:  "iptables",
		conntrack: "ipv4",
	},
	{
		name:      "IPv6",
		proxy:     netip.MustParseAddr("fd00::2"),
		node:      netip.MustParsePrefix("2001:db8::1/64"),
		client:    netip.MustParsePrefix("2001:db8::2/64"),
		iptables:  "ip6tables",
		conntrack: "ipv6",
	},
}

const (
	// proxyPort is the sidecar's default --port.
	proxyPort = 443
	// controlPort is a port on the node's veth address that the node's
	// firewall accepts on its own, tracked, as a control.
	controlPort = 8080
	// droppedDialTimeout bounds a dial that is expected to fail: the SYN is
	// dropped, so only the timeout ends it.
	droppedDialTimeout = time.Second
	// echoTimeout bounds a dial, write or read that is expected to succeed.
	echoTimeout = 5 * time.Second
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
	netnstest.Require(t)
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "conntrack")
	bin := buildSidecar(t)
	for _, backend := range []string{"nft", "legacy"} {
		for _, fam := range trafficFamilies {
			t.Run(backend+"/"+fam.name, func(t *testing.T) {
				t.Parallel()
				testTraffic(t, bin, backend, backend, fam)
			})
		}
	}
	// A legacy node, as kube-proxy and kubelet leave it, with the backend
	// left to detection: only rules written through legacy let traffic in,
	// since the node's DROP policy and its rules live there.
	for _, fam := range trafficFamilies {
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
func testTraffic(t *testing.T, bin, backend, flag string, fam trafficFamily) {
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
		cmd := node.Command(bin, append([]string{"--ip-address", fam.proxy.String(), "--daemon=false", "--iptables-backend", flag}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", cmd, err, out)
		}
		return string(out)
	}
	proxy := netip.AddrPortFrom(fam.proxy, proxyPort)
	control := netip.AddrPortFrom(fam.node.Addr(), controlPort)

	// The address alone: the proxy can listen, but its SYN is dropped. The
	// control shows that the veth, the routes and neighbour discovery work.
	if log := sidecar(); !strings.Contains(log, `"Address is in place; rules not managed (no --setup-iptables)"`) {
		t.Errorf("without --setup-iptables the one-shot run does not say that it left the rules alone:\n%s", log)
	}
	listenEcho(t, node, proxy)
	listenEcho(t, node, control)
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
		if e.mentions(fam.proxy, proxyPort) {
			t.Errorf("conntrack tracks the proxy's traffic: %s", e.line)
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

// buildSidecar builds the sidecar from the package under test into the
// test's temporary directory, once for all subtests, and returns its path.
// When the tests run with the race detector, so does the sidecar (which
// needs cgo): a data race in the daemon is reported on its stderr, and
// startDaemonEnv fails the test that ran it.
func buildSidecar(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, ".")...)
	if raceEnabled {
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	return bin
}

// addVethAddr adds p to dev in ns; an IPv6 address without duplicate
// address detection, so it is usable at once.
func addVethAddr(t *testing.T, ns *netnstest.NS, dev string, p netip.Prefix) {
	t.Helper()
	args := []string{"addr", "add", p.String(), "dev", dev}
	if p.Addr().Is6() {
		args = append(args, "nodad")
	}
	ns.Run(t, "ip", args...)
}

// listenEcho serves, inside ns, an echo server on addr until the test ends.
func listenEcho(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns.Name, err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	// Closing the server's side ends every echo even when the client's FIN
	// was dropped by the firewall.
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
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
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// dialFrom connects from inside ns to addr. A connection is closed when the
// test ends, if not before.
func dialFrom(t *testing.T, ns *netnstest.NS, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := ns.Do(t, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: timeout}).Dial("tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, nil
}

// mustEcho connects from inside ns to the echo server at addr, writes a
// message and requires the same bytes back. It returns the connection, left
// open until the test ends.
func mustEcho(t *testing.T, ns *netnstest.NS, addr netip.AddrPort, what string) net.Conn {
	t.Helper()
	c, err := dialFrom(t, ns, addr, echoTimeout)
	if err != nil {
		t.Fatalf("%s: dialing %s: %v", what, addr, err)
	}
	if err := c.SetDeadline(time.Now().Add(echoTimeout)); err != nil {
		t.Fatal(err)
	}
	msg := []byte("echo " + what + " via " + addr.String())
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("%s: writing to %s: %v", what, addr, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("%s: reading back from %s: %v (got %q)", what, addr, err, got)
	}
	if string(got) != string(msg) {
		t.Fatalf("%s: %s echoed %q, want %q", what, addr, got, msg)
	}
	return c
}

// mustBeDropped requires a dial from inside ns to addr to time out, as it
// does when the SYN is dropped. A refusal or any other error would mean
// something else is wrong.
func mustBeDropped(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	c, err := dialFrom(t, ns, addr, droppedDialTimeout)
	if err == nil {
		t.Fatalf("connected to %s from %s -> %s; want the SYN dropped", addr, c.LocalAddr(), c.RemoteAddr())
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("dialing %s: %v; want a timeout (SYN dropped)", addr, err)
	}
}

// ctEntry is one line of `conntrack -L`.
type ctEntry struct {
	line string
	// fields are its key=value fields in order; the original direction's
	// src, dst, sport and dport come first.
	fields [][2]string
}

// conntrackEntries lists the connections conntrack tracks in ns for family.
func conntrackEntries(t *testing.T, ns *netnstest.NS, family string) []ctEntry {
	t.Helper()
	var entries []ctEntry
	for _, line := range strings.Split(ns.Run(t, "conntrack", "-L", "-f", family), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		e := ctEntry{line: line}
		for _, f := range strings.Fields(line) {
			if k, v, ok := strings.Cut(f, "="); ok {
				e.fields = append(e.fields, [2]string{k, v})
			}
		}
		entries = append(entries, e)
	}
	return entries
}

// first returns the value of the first field named key, or "".
func (e ctEntry) first(key string) string {
	for _, f := range e.fields {
		if f[0] == key {
			return f[1]
		}
	}
	return ""
}

// mentions reports whether e has addr as a source or destination in either
// direction, or port as a source or destination port.
func (e ctEntry) mentions(addr netip.Addr, port int) bool {
	for _, f := range e.fields {
		switch f[0] {
		case "src", "dst":
			if a, err := netip.ParseAddr(f[1]); err == nil && a == addr {
				return true
			}
		case "sport", "dport":
			if f[1] == strconv.Itoa(port) {
				return true
			}
		}
	}
	return false
}

// hasConnection reports whether entries hold c, by its original direction:
// from c's local to c's remote address and port.
func hasConnection(entries []ctEntry, c net.Conn) bool {
	local, remote := tcpAddrPort(c.LocalAddr()), tcpAddrPort(c.RemoteAddr())
	for _, e := range entries {
		src, err1 := netip.ParseAddr(e.first("src"))
		dst, err2 := netip.ParseAddr(e.first("dst"))
		if err1 != nil || err2 != nil {
			continue
		}
		if netip.AddrPortFrom(src, conntrackPort(e.first("sport"))) == local &&
			netip.AddrPortFrom(dst, conntrackPort(e.first("dport"))) == remote {
			return true
		}
	}
	return false
}

// tcpAddrPort is a's address, unmapped (net gives IPv4 in its 16-byte form),
// and port.
func tcpAddrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func conntrackPort(s string) uint16 {
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil {
		return 0
	}
	return uint16(p)
}

func conntrackLines(entries []ctEntry) string {
	lines := make([]string, len(entries))
	for i, e := range entries {
		lines[i] = e.line
	}
	return strings.Join(lines, "\n")
}
