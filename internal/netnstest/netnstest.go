// Package netnstest creates throw-away network namespaces for tests that
// need a real kernel: netlink, iptables, nftables, conntrack and sockets.
//
// Every namespace is created with `ip netns add`, has its loopback up and is
// deleted by t.Cleanup, also when the test fails midway. Tests built on this
// package never touch the network namespace of the host.
//
// The tests need root. Without root they are skipped, except when the
// environment variable CI is "true": there a skip would hide missing
// coverage, so they fail instead. Under -short they are always skipped:
// go test -short asks for the fast tests only.
package netnstest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nsthread"
)

// namePrefix starts the name of every namespace this package creates, so a
// leftover one is easy to recognise in `ip netns list`.
const namePrefix = "apsc-test-"

// Require skips the test unless it runs as root with the ip binary
// installed. In CI (CI=true) it fails the test instead of skipping it.
// Under -short (go test -short, which asks for the fast tests only) it
// skips, in CI too.
func Require(t testing.TB) {
	t.Helper()
	if testing.Short() {
		// Asked for on the command line: not hidden coverage, even in CI.
		t.Skip("skipping: network-namespace test (-short runs only the fast tests)")
	}
	if os.Geteuid() != 0 {
		skipOrFatal(t, "network-namespace tests must run as root in CI",
			"skipping: network-namespace tests need root (run `sudo make test`)")
	}
	RequireBinaries(t, "ip")
}

// RequireBinaries skips the test unless every named binary is in PATH. In CI
// (CI=true) it fails the test instead of skipping it.
func RequireBinaries(t testing.TB, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			skipOrFatal(t,
				fmt.Sprintf("network-namespace tests need %q in PATH in CI: %v", name, err),
				fmt.Sprintf("skipping: network-namespace tests need %q in PATH: %v", name, err))
		}
	}
}

func skipOrFatal(t testing.TB, fatalMsg, skipMsg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(fatalMsg)
	}
	t.Skip(skipMsg)
}

// NS is a named network namespace that lives as long as the test that
// created it.
type NS struct {
	// Name is the namespace's name, as used by `ip netns` and `ip -n`.
	Name string
}

// New calls Require, creates a uniquely named network namespace, brings its
// loopback up and registers a cleanup that deletes it.
func New(t testing.TB) *NS {
	t.Helper()
	Require(t)
	suffix := make([]byte, 4)
	if _, err := rand.Read(suffix); err != nil {
		t.Fatalf("naming network namespace: %v", err)
	}
	n := &NS{Name: namePrefix + hex.EncodeToString(suffix)}
	runHost(t, "ip", "netns", "add", n.Name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput(); err != nil {
			t.Errorf("deleting network namespace %s: %v: %s", n.Name, err, out)
		}
	})
	runHost(t, "ip", "-n", n.Name, "link", "set", "lo", "up")
	return n
}

// runHost runs an ip command that manages namespaces from the outside.
func runHost(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// Command returns, not started, the command that runs name with args inside
// the namespace (`ip netns exec NAME name args...`). Use it for background
// processes such as `nft monitor` or a built binary under test.
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// RunErr runs name with args inside the namespace and returns its stdout. A
// non-zero exit is returned as an error that carries the command and its
// stderr.
func (n *NS) RunErr(name string, args ...string) (string, error) {
	cmd := n.Command(name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s in netns %s: %w: %s",
			strings.Join(append([]string{name}, args...), " "), n.Name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Run runs name with args inside the namespace and returns its stdout. A
// non-zero exit fails the test, reporting the command, its stdout and its
// stderr.
func (n *NS) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := n.RunErr(name, args...)
	if err != nil {
		t.Fatalf("%v\nstdout:\n%s", err, out)
	}
	return out
}

// NetNS opens a handle on the namespace, closed at cleanup.
func (n *NS) NetNS(t testing.TB) netns.NsHandle {
	t.Helper()
	h, err := netns.GetFromName(n.Name)
	if err != nil {
		t.Fatalf("opening network namespace %s: %v", n.Name, err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// Handle returns a netlink handle bound to the namespace, closed at cleanup.
func (n *NS) Handle(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(n.NetNS(t))
	if err != nil {
		t.Fatalf("netlink handle in network namespace %s: %v", n.Name, err)
	}
	t.Cleanup(h.Close)
	return h
}

// Do runs f on an OS thread switched into the namespace and returns f's
// error, or the error of switching (see DoIn).
func (n *NS) Do(t testing.TB, f func() error) error {
	t.Helper()
	target, err := netns.GetFromName(n.Name)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", n.Name, err)
	}
	defer target.Close()
	return DoIn(target, f)
}

// DoIn runs f on an OS thread switched into the network namespace target
// and returns f's error, or the error of switching (see nsthread.Run).
// Sockets opened by f stay in the namespace, and a process f starts starts
// there, so DoIn is the way to listen, dial or start a program inside it.
// DoIn needs no test: programs such as hack/bench use it too.
func DoIn(target netns.NsHandle, f func() error) error { return nsthread.Run(target, f) }

// RequireLinkKind skips the test unless the kernel can create links of kind
// (for example "dummy"), probing inside the namespace. In CI (CI=true) it
// fails the test instead of skipping it.
func (n *NS) RequireLinkKind(t testing.TB, kind string) {
	t.Helper()
	const probe = "apsc-probe"
	if _, err := n.RunErr("ip", "link", "add", probe, "type", kind); err != nil {
		skipOrFatal(t,
			fmt.Sprintf("kernel cannot create %s links in CI: %v", kind, err),
			fmt.Sprintf("skipping: kernel cannot create %s links: %v", kind, err))
	}
	n.Run(t, "ip", "link", "del", probe)
}

// linkKinds caches SupportsLinkKind's answers by kind: whether the kernel
// can create a kind of link does not depend on the namespace.
var linkKinds struct {
	mu        sync.Mutex
	supported map[string]bool
}

// SupportsLinkKind reports whether the kernel can create links of kind (for
// example "dummy"). The first call for a kind probes by adding and deleting a
// link inside the namespace; later calls return the cached answer. Unlike
// RequireLinkKind it neither skips nor fails the test when the kind is
// missing, so that a test can fall back to another kind. Any other failure
// of the probe fails the test.
func (n *NS) SupportsLinkKind(t testing.TB, kind string) bool {
	t.Helper()
	linkKinds.mu.Lock()
	defer linkKinds.mu.Unlock()
	if ok, probed := linkKinds.supported[kind]; probed {
		return ok
	}
	const probe = "apsc-probe"
	ok := true
	if _, err := n.RunErr("ip", "link", "add", probe, "type", kind); err != nil {
		if !isUnsupportedLinkKind(err) {
			t.Fatalf("probing for %s links: %v", kind, err)
		}
		t.Logf("kernel cannot create %s links: %v", kind, err)
		ok = false
	} else {
		n.Run(t, "ip", "link", "del", probe)
	}
	if linkKinds.supported == nil {
		linkKinds.supported = make(map[string]bool)
	}
	linkKinds.supported[kind] = ok
	return ok
}

// isUnsupportedLinkKind reports whether err, from `ip link add NAME type
// KIND`, says that the kernel lacks KIND: iproute2 prints the kernel's
// "Unknown device type" or, from older kernels, "Operation not supported".
func isUnsupportedLinkKind(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "Unknown device type") || strings.Contains(msg, "Operation not supported")
}

// Veth creates a veth pair with aName in namespace a and bName in namespace
// b, and brings both ends up. The pair goes away with the namespaces.
func Veth(t testing.TB, a, b *NS, aName, bName string) {
	t.Helper()
	runHost(t, "ip", "-n", a.Name, "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
	runHost(t, "ip", "-n", a.Name, "link", "set", aName, "up")
	runHost(t, "ip", "-n", b.Name, "link", "set", bName, "up")
}
