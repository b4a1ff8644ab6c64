package e2e

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestDaemonServesHealthAndMetrics runs the sidecar binary as a daemon in a
// namespace with both listeners, as the DaemonSet does: /readyz turns 200
// after the first sync, /metrics counts it and names the backend, /readyz
// turns 503 with the reason while the address cannot be added and 200
// again once it can, and SIGTERM stops it with exit code 0.
func TestDaemonServesHealthAndMetrics(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "ip6tables-nft")
	ns := netnstest.New(t)
	// The namespace has a loopback of its own: fixed ports are free.
	const health, metrics = "http://127.0.0.1:16911", "127.0.0.1:16910"
	d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", "nft",
		"--sync-interval", "1s", "--health-probe-bind-address", "127.0.0.1:16911", "--metrics-bind-address", ":16910")
	c := httpIn(t, ns)
	readyz := func() (int, string) { return fetchIn(t, c, health+"/readyz") }

	eventually(t, "/readyz answers 200", func() bool { code, _ := readyz(); return code == 200 })
	if code, body := fetchIn(t, c, health+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("GET /healthz: %d %q, want 200 \"ok\\n\"", code, body)
	}
	m := scrape(t, ns, metrics)
	if n := m.must(t, syncSuccesses); n < 1 {
		t.Errorf("/metrics: %s %v, want at least 1 successful sync", syncSuccesses, n)
	}
	for _, want := range []series{
		{"apiserver_proxy_sidecar_iptables_backend_info", []string{"backend", "nft", "family", "IPv4"}},
		{"apiserver_proxy_sidecar_iptables_backend_info", []string{"backend", "nft", "family", "IPv6"}},
		{"apiserver_proxy_sidecar_verifications_total", []string{"trigger", "startup"}},
	} {
		if v, ok := m.lookup(want); !ok || v != 1 {
			t.Errorf("/metrics lacks %s 1:\n%s", want, m.text)
		}
	}

	// IPv6 off on lo: the kernel removes fd00::2 and refuses it back.
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
	eventually(t, "/readyz answers 503", func() bool { code, _ := readyz(); return code == 503 })
	if _, body := readyz(); !strings.HasPrefix(body, "address: ") || !strings.Contains(body, "fd00::2") || strings.Count(body, "\n") != 1 {
		t.Errorf("GET /readyz while the address cannot be added: %q, want one line about fd00::2", body)
	}
	if code, body := fetchIn(t, c, health+"/healthz"); code != 200 {
		t.Errorf("GET /healthz while syncs fail: %d %q, want 200: failing syncs are alive", code, body)
	}
	ns.Run(t, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=0")
	eventually(t, "/readyz answers 200 again", func() bool { code, _ := readyz(); return code == 200 })

	if code := d.stop(t); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
	if code, _ := fetchIn(t, c, health+"/healthz"); code != 0 {
		t.Errorf("the health listener still answers after the sidecar exited")
	}
}

// TestDaemonExitsWhenItCannotListen holds the health port with a socket
// that does not share it: the sidecar must exit 1 naming the address,
// before its first sync has touched anything.
func TestDaemonExitsWhenItCannotListen(t *testing.T) {
	bin := e2eTest(t)
	ns := netnstest.New(t)
	var held net.Listener
	if err := ns.Do(t, func() error {
		var err error
		held, err = net.Listen("tcp", "127.0.0.1:16911")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--health-probe-bind-address", "127.0.0.1:16911")
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the sidecar still runs 30s after it could not listen")
	}
	if code := d.cmd.ProcessState.ExitCode(); code != exitFailure {
		t.Errorf("exit code %d, want %d", code, exitFailure)
	}
	if log := d.log(); !strings.Contains(log, "serving health on 127.0.0.1:16911") || !strings.Contains(log, "address already in use") {
		t.Errorf("the log does not say which address is in use:\n%s", log)
	}
	if out := ns.Run(t, "ip", "-o", "addr", "show", "dev", "lo"); strings.Contains(out, "10.96.0.2") {
		t.Errorf("the address was added although the sidecar could not start:\n%s", out)
	}
}
