package e2e

import (
	"slices"
	"strings"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestOwnershipAcrossAddressChanges runs the real binary through address
// changes on both backends: a one-shot run with another --ip-address, and
// a daemon restarted with a third, each leave only the configured address
// of ours on the link (a foreign address on the same link stays); a
// teardown run with the first, stale, address removes everything of ours
// and says what it removed.
func TestOwnershipAcrossAddressChanges(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ns.Run(t, "ip", "addr", "add", "10.96.0.9/32", "dev", "lo")
			common := []string{"--setup-iptables", "--iptables-backend=" + backend, "--port=443"}
			run := func(addr string, extra ...string) string {
				t.Helper()
				code, log := oneShot(t, ns, nil, bin, append(append([]string{"--ip-address=" + addr, "--daemon=false"}, common...), extra...)...)
				if code != 0 {
					t.Fatalf("--ip-address=%s %v: exit %d\n%s", addr, extra, code, log)
				}
				return log
			}
			want := func(what string, addrs ...string) {
				t.Helper()
				slices.Sort(addrs)
				if got := loAddrs(t, ns); !slices.Equal(got, addrs) {
					t.Fatalf("%s: lo holds %q, want %q", what, got, addrs)
				}
			}

			run("10.96.0.2,fd00::2")
			want("first run", "10.96.0.2/32", "fd00::2/128", "10.96.0.9/32")

			log := run("10.96.0.3")
			want("after a one-shot run with 10.96.0.3", "10.96.0.3/32", "10.96.0.9/32")
			for _, gone := range []string{"10.96.0.2/32", "fd00::2/128"} {
				if !strings.Contains(log, "no longer configured") || !strings.Contains(log, gone) {
					t.Errorf("the run does not log that it removed %s:\n%s", gone, log)
				}
			}

			d := startDaemon(t, ns, bin, append([]string{"--ip-address=10.96.0.4", "--sync-interval=1h"}, common...)...)
			eventually(t, "the restarted daemon keeps only 10.96.0.4", func() bool {
				return slices.Equal(loAddrs(t, ns), []string{"10.96.0.4/32", "10.96.0.9/32"})
			})
			if code := d.stop(t); code != 0 {
				t.Fatalf("daemon exited %d", code)
			}
			want("after the daemon stopped without --cleanup", "10.96.0.4/32", "10.96.0.9/32")
			if len(ourChains(t, ns)) == 0 {
				t.Fatal("no chain of ours before the teardown")
			}

			// Teardown with the first address, long since replaced.
			log = run("10.96.0.2", "--cleanup")
			want("after the teardown", "10.96.0.9/32")
			if left := ourChains(t, ns); len(left) != 0 {
				t.Errorf("the teardown left rules of ours:\n%s", strings.Join(left, "\n"))
			}
			for _, line := range []string{`"Removed" what="address 10.96.0.4/32 on lo"`, `what="IPv4 ` + backend + ` raw chain APISERVER-PROXY-PREROUTING"`, `what="IPv4 ` + backend + ` filter jump to APISERVER-PROXY-INPUT from INPUT"`} {
				if !strings.Contains(log, line) {
					t.Errorf("the teardown log lacks %s:\n%s", line, log)
				}
			}
			log = run("10.96.0.2", "--cleanup")
			if !strings.Contains(log, "Nothing of ours was there to remove") {
				t.Errorf("a second teardown does not say that nothing was there:\n%s", log)
			}
			code, log := oneShot(t, ns, nil, bin, "--ip-address=10.96.0.2", "--daemon=false", "--cleanup")
			if code != 0 || !strings.Contains(log, "Left iptables rules alone (no --setup-iptables)") {
				t.Errorf("a teardown without --setup-iptables: exit %d, and it must say it left the rules alone:\n%s", code, log)
			}
			want("after every teardown", "10.96.0.9/32")
		})
	}
}

// TestIPv6DisabledIsNamed runs the binary on a node with IPv6 disabled: an
// IPv6 address alone fails with an error that says so; a dual-stack pair
// serves IPv4, warns about IPv6 and exits 0, so that an init container does
// not crash-loop and take IPv4 down with it.
func TestIPv6DisabledIsNamed(t *testing.T) {
	bin := e2eTest(t, "sysctl")
	ns := netnstest.New(t)
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")

	code, log := oneShot(t, ns, nil, bin, "--ip-address=fd00::2", "--daemon=false")
	if code != 1 || !strings.Contains(log, "IPv6 is disabled on this node (net.ipv6.conf.all.disable_ipv6=1)") {
		t.Errorf("IPv6 alone: exit %d, want 1 and an error naming IPv6 disabled:\n%s", code, log)
	}
	code, log = oneShot(t, ns, nil, bin, "--ip-address=10.96.0.2,fd00::2", "--daemon=false")
	if code != 0 || !strings.Contains(log, "its family is unavailable on this node") {
		t.Errorf("dual-stack: exit %d, want 0 and a warning about IPv6:\n%s", code, log)
	}
	if got := loAddrs(t, ns); !slices.Equal(got, []string{"10.96.0.2/32"}) {
		t.Errorf("lo holds %q, want the IPv4 address", got)
	}

	// Disabled on the interface alone, IPv6 clients exist: a failure.
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=0")
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
	code, log = oneShot(t, ns, nil, bin, "--ip-address=10.96.0.2,fd00::2", "--daemon=false")
	if code != 1 || !strings.Contains(log, "IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6=1)") {
		t.Errorf("IPv6 off on lo alone: exit %d, want 1 and an error naming lo:\n%s", code, log)
	}
}

// TestIPVSHeldAddressIsNeverTouched runs the binary on a node where kube-proxy
// in IPVS mode holds the ClusterIP on kube-ipvs0: the run fails with an
// error naming IPVS, the proxy address is still served, and kube-ipvs0 keeps
// its address through the run and a teardown.
func TestIPVSHeldAddressIsNeverTouched(t *testing.T) {
	bin := e2eTest(t)
	ns := netnstest.New(t)
	addForeignLink(t, ns, "kube-ipvs0")
	ns.Run(t, "ip", "addr", "add", "100.64.0.1/32", "dev", "kube-ipvs0")
	ipvs := func() string { return ns.Run(t, "ip", "-o", "addr", "show", "dev", "kube-ipvs0") }

	code, log := oneShot(t, ns, nil, bin, "--ip-address=10.96.0.2,100.64.0.1", "--daemon=false")
	if code != 1 || !strings.Contains(log, "100.64.0.1 is on kube-ipvs0") || !strings.Contains(log, "IPVS") {
		t.Errorf("exit %d, want 1 and an error naming kube-ipvs0 and IPVS:\n%s", code, log)
	}
	if got := loAddrs(t, ns); !slices.Equal(got, []string{"10.96.0.2/32"}) {
		t.Errorf("lo holds %q, want only the proxy address", got)
	}
	if !strings.Contains(ipvs(), " 100.64.0.1/32 ") {
		t.Fatalf("kube-ipvs0 lost 100.64.0.1:\n%s", ipvs())
	}
	if code, log := oneShot(t, ns, nil, bin, "--ip-address=10.96.0.2,100.64.0.1", "--daemon=false", "--cleanup"); code != 0 {
		t.Errorf("teardown: exit %d\n%s", code, log)
	}
	if !strings.Contains(ipvs(), " 100.64.0.1/32 ") {
		t.Errorf("the teardown removed 100.64.0.1 from kube-ipvs0:\n%s", ipvs())
	}
}

// addForeignLink adds a link the sidecar did not create, of a kind the
// test kernel has.
func addForeignLink(t *testing.T, ns *netnstest.NS, name string) {
	t.Helper()
	var errs []string
	for _, kind := range []string{"dummy", "ifb", "bridge"} {
		if _, err := ns.RunErr("ip", "link", "add", name, "type", kind); err == nil {
			ns.Run(t, "ip", "link", "set", name, "up")
			return
		}
		errs = append(errs, kind)
	}
	t.Fatalf("cannot add link %s of any kind: %s", name, strings.Join(errs, ", "))
}
