package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// httpIn returns a client whose connections are dialled inside ns.
func httpIn(t *testing.T, ns *netnstest.NS) *http.Client {
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				var c net.Conn
				err := ns.Do(t, func() error {
					var err error
					c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
					return err
				})
				return c, err
			},
		},
	}
}

// fetchIn GETs url from inside the namespace the client dials in; code is
// 0 when the request failed (nothing listening yet).
func fetchIn(t *testing.T, c *http.Client, url string) (code int, body string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

var successfulSyncs = regexp.MustCompile(`(?m)^apiserver_proxy_sidecar_syncs_total\{result="success"\} (\S+)$`)

// TestDaemonServesHealthAndMetrics runs the sidecar binary as a daemon in a
// namespace with both listeners, as the DaemonSet does: /readyz turns 200
// after the first sync, /metrics counts it and names the backend, /readyz
// turns 503 with the reason while the address cannot be added and 200
// again once it can, and SIGTERM stops it with exit code 0.
func TestDaemonServesHealthAndMetrics(t *testing.T) {
	netnstest.Require(t)
	netnstest.RequireBinaries(t, "iptables-nft", "ip6tables-nft")
	bin := buildSidecar(t)
	ns := netnstest.New(t)
	// The namespace has a loopback of its own: fixed ports are free.
	const health, metrics = "http://127.0.0.1:16911", "http://127.0.0.1:16910"
	d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", "nft",
		"--sync-interval", "1s", "--health-probe-bind-address", "127.0.0.1:16911", "--metrics-bind-address", ":16910")
	c := httpIn(t, ns)
	readyz := func() (int, string) { return fetchIn(t, c, health+"/readyz") }

	eventually(t, 10*time.Second, "/readyz answers 200", func() bool { code, _ := readyz(); return code == 200 })
	if code, body := fetchIn(t, c, health+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("GET /healthz: %d %q, want 200 \"ok\\n\"", code, body)
	}
	code, body := fetchIn(t, c, metrics+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d %q", code, body)
	}
	m := successfulSyncs.FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("/metrics has no successful syncs series:\n%s", body)
	}
	if n, err := strconv.ParseFloat(m[1], 64); err != nil || n < 1 {
		t.Errorf("/metrics: %s, want at least 1 successful sync", m[0])
	}
	for _, want := range []string{
		`apiserver_proxy_sidecar_iptables_backend_info{backend="nft",family="IPv4"} 1`,
		`apiserver_proxy_sidecar_iptables_backend_info{backend="nft",family="IPv6"} 1`,
		`apiserver_proxy_sidecar_verifications_total{trigger="startup"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, body)
		}
	}

	// IPv6 off on lo: the kernel removes fd00::2 and refuses it back.
	ns.Run(t, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6")
	eventually(t, 10*time.Second, "/readyz answers 503", func() bool { code, _ := readyz(); return code == 503 })
	if _, body := readyz(); !strings.HasPrefix(body, "address: ") || !strings.Contains(body, "fd00::2") || strings.Count(body, "\n") != 1 {
		t.Errorf("GET /readyz while the address cannot be added: %q, want one line about fd00::2", body)
	}
	if code, body := fetchIn(t, c, health+"/healthz"); code != 200 {
		t.Errorf("GET /healthz while syncs fail: %d %q, want 200: failing syncs are alive", code, body)
	}
	ns.Run(t, "sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/lo/disable_ipv6")
	eventually(t, 10*time.Second, "/readyz answers 200 again", func() bool { code, _ := readyz(); return code == 200 })

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
	netnstest.Require(t)
	bin := buildSidecar(t)
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
