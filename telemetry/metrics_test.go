package telemetry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/apply"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// t0 is when every test's fake clock starts.
var t0 = time.Unix(1_800_000_000, 0)

func newTest(interval time.Duration) (*Telemetry, *clocktesting.FakePassiveClock) {
	clk := clocktesting.NewFakePassiveClock(t0)
	return New(Options{SyncInterval: interval, Version: "v1.2.3", Clock: clk}), clk
}

// get serves one request to path from h and returns the code and body.
func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if ct := rec.Header().Get("Content-Type"); rec.Code != http.StatusNotFound && ct != "text/plain; charset=utf-8" {
		t.Errorf("GET %s: Content-Type %q, want plain text", path, ct)
	}
	return rec.Code, rec.Body.String()
}

// lockHeld is the error of an iptables-restore that gave up on the lock.
var lockHeld = &apply.ToolError{
	Command:  []string{"iptables-legacy-restore", "--noflush", "--wait=5"},
	ExitCode: 4,
	Stderr:   "Can't lock /run/xtables.lock: Resource temporarily unavailable\nAnother app is currently holding the xtables lock. Stopped waiting after 5s.\n",
	Err:      errors.New("exit status 4"),
}

func TestReadiness(t *testing.T) {
	addrErr := fmt.Errorf("address: %w", errors.New("adding 10.96.0.2/32 to lo: operation not permitted"))
	rulesErr := errors.Join(
		fmt.Errorf("IPv4 rules: %w", lockHeld),
		fmt.Errorf("IPv6 rules: %w", errors.New("ip6tables-nft -t raw -S OUTPUT: exit status 1:\nip6tables v1.8.9 (nf_tables): Could not fetch rule set generation id:\nPermission denied (you must be root)")),
	)
	const (
		addrLine = "address: adding 10.96.0.2/32 to lo: operation not permitted"
		v4Line   = "IPv4 rules: iptables-legacy-restore --noflush --wait=5: exit status 4: Can't lock /run/xtables.lock: Resource temporarily unavailable Another app is currently holding the xtables lock. Stopped waiting after 5s."
		v6Line   = "IPv6 rules: ip6tables-nft -t raw -S OUTPUT: exit status 1: ip6tables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
	)
	ok := apply.SyncResult{Duration: time.Millisecond}
	for _, tc := range []struct {
		name     string
		syncs    []apply.SyncResult
		wantCode int
		wantBody string
	}{
		{"before the first sync", nil, 503, "no sync has finished yet\n"},
		{"after a successful sync", []apply.SyncResult{ok}, 200, "ok\n"},
		{"first sync failed on the address", []apply.SyncResult{{Address: addrErr}}, 503, addrLine + "\n"},
		{"address lost after a success", []apply.SyncResult{ok, {Address: addrErr}}, 503, addrLine + "\n"},
		{"rules failed, one line per family", []apply.SyncResult{ok, {Rules: rulesErr}}, 503, v4Line + "\n" + v6Line + "\n"},
		{"rules of one family failed", []apply.SyncResult{ok, {Rules: errors.Join(fmt.Errorf("IPv4 rules: %w", lockHeld))}}, 503, v4Line + "\n"},
		{"address and rules failed", []apply.SyncResult{{Address: addrErr, Rules: rulesErr}}, 503, addrLine + "\n" + v4Line + "\n" + v6Line + "\n"},
		{"recovered", []apply.SyncResult{ok, {Address: addrErr}, {Rules: rulesErr}, ok}, 200, "ok\n"},
		{"recovered without ever succeeding before", []apply.SyncResult{{Rules: rulesErr}, ok}, 200, "ok\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tel, _ := newTest(time.Minute)
			for _, r := range tc.syncs {
				tel.SyncFinished(r)
			}
			code, body := get(t, tel.HealthHandler(), "/readyz")
			if code != tc.wantCode || body != tc.wantBody {
				t.Errorf("GET /readyz: %d %q, want %d %q", code, body, tc.wantCode, tc.wantBody)
			}
		})
	}
}

func TestLiveness(t *testing.T) {
	// With a 1m interval, the sync loop may be quiet for 3m.
	type step struct {
		at       time.Duration // since start
		sync     bool          // a sync finishes at that moment
		failed   bool          // and it failed
		wantCode int
		wantBody string
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"starting", []step{
			{at: 0, wantCode: 200, wantBody: "ok\n"},
			{at: 3*time.Minute - time.Second, wantCode: 200, wantBody: "ok\n"},
			{at: 3 * time.Minute, wantCode: 500, wantBody: "no sync has finished in the 3m0s since start (limit 3m0s)\n"},
		}},
		{"syncing", []step{
			{at: 2 * time.Minute, sync: true, wantCode: 200, wantBody: "ok\n"},
			{at: 5*time.Minute - time.Second, wantCode: 200, wantBody: "ok\n"},
			{at: 5*time.Minute + 30*time.Second, wantCode: 500, wantBody: "the last sync finished 3m30s ago (limit 3m0s)\n"},
			{at: 6 * time.Minute, sync: true, wantCode: 200, wantBody: "ok\n"},
		}},
		{"failing syncs are alive", []step{
			{at: time.Minute, sync: true, failed: true, wantCode: 200, wantBody: "ok\n"},
			{at: 2 * time.Minute, sync: true, failed: true, wantCode: 200, wantBody: "ok\n"},
			{at: 4*time.Minute + 59*time.Second, wantCode: 200, wantBody: "ok\n"},
			{at: 5 * time.Minute, wantCode: 500, wantBody: "the last sync finished 3m0s ago (limit 3m0s)\n"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tel, clk := newTest(time.Minute)
			for _, s := range tc.steps {
				clk.SetTime(t0.Add(s.at))
				if s.sync {
					r := apply.SyncResult{}
					if s.failed {
						r.Rules = lockHeld
					}
					tel.SyncFinished(r)
				}
				code, body := get(t, tel.HealthHandler(), "/healthz")
				if code != s.wantCode || body != s.wantBody {
					t.Errorf("at %s: GET /healthz: %d %q, want %d %q", s.at, code, body, s.wantCode, s.wantBody)
				}
			}
		})
	}
}

// series returns the sidecar's own series in the text exposition format,
// without the HELP and TYPE lines.
func series(t *testing.T, tel *Telemetry) string {
	t.Helper()
	mfs, err := tel.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), Namespace+"_") {
			names = append(names, mf.GetName())
		}
	}
	text, err := testutil.GatherAndFormat(tel.Registry(), expfmt.TypeTextPlain, names...)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for line := range strings.Lines(string(text)) {
		if !strings.HasPrefix(line, "#") {
			b.WriteString(line)
		}
	}
	return b.String()
}

// buildInfo is the build_info series of newTest's Telemetry.
var buildInfo = `apiserver_proxy_sidecar_build_info{goversion="` + runtime.Version() + `",version="v1.2.3"} 1` + "\n"

// TestSeriesExistFromTheStart proves that every labelled series an alert
// would use is there at 0 before anything happened; the per-family ones
// appear with the family's backend.
func TestSeriesExistFromTheStart(t *testing.T) {
	tel, _ := newTest(time.Minute)
	want := buildInfo + `apiserver_proxy_sidecar_last_successful_sync_timestamp_seconds 0
apiserver_proxy_sidecar_ready 0
apiserver_proxy_sidecar_repairs_total{object="address"} 0
apiserver_proxy_sidecar_repairs_total{object="chain"} 0
apiserver_proxy_sidecar_repairs_total{object="jump"} 0
apiserver_proxy_sidecar_repairs_total{object="link"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.001"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.002"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.004"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.008"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.016"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.032"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.064"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.128"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.256"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.512"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="1.024"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="2.048"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="4.096"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="8.192"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="16.384"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="+Inf"} 0
apiserver_proxy_sidecar_sync_duration_seconds_sum 0
apiserver_proxy_sidecar_sync_duration_seconds_count 0
apiserver_proxy_sidecar_syncs_total{result="failure"} 0
apiserver_proxy_sidecar_syncs_total{result="success"} 0
apiserver_proxy_sidecar_verifications_skipped_total{reason="generation_unchanged"} 0
apiserver_proxy_sidecar_verifications_skipped_total{reason="legacy_unchanged"} 0
apiserver_proxy_sidecar_verifications_total{trigger="address_event"} 0
apiserver_proxy_sidecar_verifications_total{trigger="interval"} 0
apiserver_proxy_sidecar_verifications_total{trigger="legacy_change"} 0
apiserver_proxy_sidecar_verifications_total{trigger="link_event"} 0
apiserver_proxy_sidecar_verifications_total{trigger="nftables_event"} 0
apiserver_proxy_sidecar_verifications_total{trigger="retry"} 0
apiserver_proxy_sidecar_verifications_total{trigger="startup"} 0
`
	if diff := cmp.Diff(want, series(t, tel)); diff != "" {
		t.Errorf("series before anything happened (-want +got):\n%s", diff)
	}
}

// TestMetricsAfterSyncs plays a scripted sequence of observer calls, as
// the sidecar makes them, and checks every series of ours.
func TestMetricsAfterSyncs(t *testing.T) {
	tel, clk := newTest(time.Minute)
	// Durations are whole multiples of 2^-9 s, so that the sum is exact.
	const unit = 1953125 * time.Nanosecond

	// Startup: both families on nft, everything put in place.
	tel.Verification(apply.TriggerStartup)
	tel.BackendChosen(render.IPv4, apply.BackendNFT)
	tel.BackendChosen(render.IPv6, apply.BackendNFT)
	tel.Repaired(apply.ObjectAddress)
	for range 2 {
		tel.Repaired(apply.ObjectChain)
		tel.Repaired(apply.ObjectJump)
		tel.RestoreRan(render.IPv4, nil)
		tel.RestoreRan(render.IPv6, nil)
	}
	tel.SyncFinished(apply.SyncResult{Started: t0, Duration: 2 * unit})

	// An idle interval: the generation has not moved.
	clk.SetTime(t0.Add(time.Minute))
	tel.Verification(apply.TriggerInterval)
	tel.VerificationSkipped(apply.SkipGenerationUnchanged)
	tel.VerificationSkipped(apply.SkipGenerationUnchanged)
	tel.SyncFinished(apply.SyncResult{Duration: unit})

	// A flushed chain; kube-proxy holds the lock for too long.
	clk.SetTime(t0.Add(2 * time.Minute))
	tel.Verification(apply.TriggerNFTables)
	tel.RestoreRan(render.IPv4, lockHeld)
	tel.SyncFinished(apply.SyncResult{Duration: 5500 * time.Millisecond, Rules: fmt.Errorf("IPv4 rules: %w", lockHeld)})

	// The address is gone and cannot be added back; IPv6's restore fails.
	clk.SetTime(t0.Add(2*time.Minute + 10*time.Second))
	tel.Verification(apply.TriggerAddress)
	tel.RestoreRan(render.IPv6, errors.New("exit status 2"))
	tel.SyncFinished(apply.SyncResult{Duration: 8 * unit, Address: errors.New("address: operation not permitted")})

	// Connections DNATed into our address whose replies we untrack.
	clusterIP, proxy := netip.MustParseAddrPort("100.64.0.1:443"), netip.MustParseAddrPort("10.96.0.2:443")
	tel.UntrackedDNAT(clusterIP, proxy, 3)
	tel.UntrackedDNAT(clusterIP, proxy, 1)

	want := buildInfo + `apiserver_proxy_sidecar_iptables_backend_info{backend="nft",family="IPv4"} 1
apiserver_proxy_sidecar_iptables_backend_info{backend="nft",family="IPv6"} 1
apiserver_proxy_sidecar_iptables_restore_failures_total{family="IPv4"} 1
apiserver_proxy_sidecar_iptables_restore_failures_total{family="IPv6"} 1
apiserver_proxy_sidecar_iptables_restore_total{family="IPv4"} 3
apiserver_proxy_sidecar_iptables_restore_total{family="IPv6"} 3
apiserver_proxy_sidecar_last_successful_sync_timestamp_seconds 1.80000006e+09
apiserver_proxy_sidecar_ready 0
apiserver_proxy_sidecar_repairs_total{object="address"} 1
apiserver_proxy_sidecar_repairs_total{object="chain"} 2
apiserver_proxy_sidecar_repairs_total{object="jump"} 2
apiserver_proxy_sidecar_repairs_total{object="link"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.001"} 0
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.002"} 1
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.004"} 2
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.008"} 2
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.016"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.032"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.064"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.128"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.256"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="0.512"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="1.024"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="2.048"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="4.096"} 3
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="8.192"} 4
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="16.384"} 4
apiserver_proxy_sidecar_sync_duration_seconds_bucket{le="+Inf"} 4
apiserver_proxy_sidecar_sync_duration_seconds_sum 5.521484375
apiserver_proxy_sidecar_sync_duration_seconds_count 4
apiserver_proxy_sidecar_syncs_total{result="failure"} 2
apiserver_proxy_sidecar_syncs_total{result="success"} 2
apiserver_proxy_sidecar_untracked_dnat_connections_total{address="10.96.0.2:443",destination="100.64.0.1:443"} 4
apiserver_proxy_sidecar_verifications_skipped_total{reason="generation_unchanged"} 2
apiserver_proxy_sidecar_verifications_skipped_total{reason="legacy_unchanged"} 0
apiserver_proxy_sidecar_verifications_total{trigger="address_event"} 1
apiserver_proxy_sidecar_verifications_total{trigger="interval"} 1
apiserver_proxy_sidecar_verifications_total{trigger="legacy_change"} 0
apiserver_proxy_sidecar_verifications_total{trigger="link_event"} 0
apiserver_proxy_sidecar_verifications_total{trigger="nftables_event"} 1
apiserver_proxy_sidecar_verifications_total{trigger="retry"} 0
apiserver_proxy_sidecar_verifications_total{trigger="startup"} 1
apiserver_proxy_sidecar_xtables_lock_waits_total{family="IPv4"} 1
apiserver_proxy_sidecar_xtables_lock_waits_total{family="IPv6"} 0
`
	if diff := cmp.Diff(want, series(t, tel)); diff != "" {
		t.Errorf("series after the scripted syncs (-want +got):\n%s", diff)
	}
}

// TestMetricsLint runs Prometheus's own linter over every metric of ours:
// names, units, suffixes and help texts.
func TestMetricsLint(t *testing.T) {
	tel, _ := newTest(time.Minute)
	tel.BackendChosen(render.IPv4, apply.BackendLegacy)
	problems, err := testutil.GatherAndLint(tel.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, Namespace+"_") {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
}

func TestBackendInfoFollowsTheBackend(t *testing.T) {
	const info = Namespace + "_iptables_backend_info"
	type choice struct {
		family  render.Family
		backend apply.Backend
	}
	for _, tc := range []struct {
		name    string
		choices []choice
		want    string
	}{
		{"none yet", nil, ""},
		{"one family", []choice{{render.IPv4, apply.BackendNFT}}, `{backend="nft",family="IPv4"} 1`},
		{"chosen again", []choice{{render.IPv4, apply.BackendNFT}, {render.IPv4, apply.BackendNFT}}, `{backend="nft",family="IPv4"} 1`},
		{"switched", []choice{{render.IPv4, apply.BackendNFT}, {render.IPv4, apply.BackendLegacy}}, `{backend="legacy",family="IPv4"} 1`},
		{"switched back", []choice{{render.IPv4, apply.BackendNFT}, {render.IPv4, apply.BackendLegacy}, {render.IPv4, apply.BackendNFT}}, `{backend="nft",family="IPv4"} 1`},
		{
			"one family switched, the other stays",
			[]choice{{render.IPv4, apply.BackendNFT}, {render.IPv6, apply.BackendNFT}, {render.IPv6, apply.BackendLegacy}},
			`{backend="legacy",family="IPv6"} 1` + "\n" + info + `{backend="nft",family="IPv4"} 1`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tel, _ := newTest(time.Minute)
			for _, c := range tc.choices {
				tel.BackendChosen(c.family, c.backend)
			}
			var got []string
			for line := range strings.Lines(series(t, tel)) {
				if strings.HasPrefix(line, info) {
					got = append(got, strings.TrimSuffix(line, "\n"))
				}
			}
			want := ""
			if tc.want != "" {
				want = info + tc.want
			}
			if diff := cmp.Diff(want, strings.Join(got, "\n")); diff != "" {
				t.Errorf("backend info (-want +got):\n%s", diff)
			}
		})
	}
}

// TestObserverIsSafeForConcurrentUse calls the observer while the
// handlers read it; the race detector does the checking.
func TestObserverIsSafeForConcurrentUse(t *testing.T) {
	tel := New(Options{SyncInterval: time.Minute})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 100 {
			tel.Verification(apply.TriggerInterval)
			tel.BackendChosen(render.IPv4, []apply.Backend{apply.BackendNFT, apply.BackendLegacy}[i%2])
			tel.RestoreRan(render.IPv4, nil)
			tel.SyncFinished(apply.SyncResult{Duration: time.Millisecond})
		}
	})
	for range 100 {
		get(t, tel.HealthHandler(), "/readyz")
		get(t, tel.HealthHandler(), "/healthz")
		series(t, tel)
	}
	wg.Wait()
	if got := testutil.ToFloat64(tel.syncs.WithLabelValues("success")); got != 100 {
		t.Errorf("%v successful syncs counted, want 100", got)
	}
}

// fetch GETs url and returns the code and body.
func fetch(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(body)
}

func start(t *testing.T, tel *Telemetry, health, metrics string) *Listeners {
	t.Helper()
	l, err := tel.Start(health, metrics)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Shutdown(context.Background()) })
	return l
}

// TestServe proves both listeners serve their paths, and only theirs.
func TestServe(t *testing.T) {
	tel, _ := newTest(time.Minute)
	l := start(t, tel, "127.0.0.1:0", "127.0.0.1:0")
	health, metrics := "http://"+l.HealthAddr().String(), "http://"+l.MetricsAddr().String()

	for _, tc := range []struct {
		url      string
		wantCode int
		wantBody string // a substring
	}{
		{health + "/healthz", 200, "ok\n"},
		{health + "/readyz", 503, "no sync has finished yet\n"},
		{health + "/metrics", 404, ""},
		{metrics + "/metrics", 200, `apiserver_proxy_sidecar_syncs_total{result="success"} 0`},
		{metrics + "/metrics", 200, `apiserver_proxy_sidecar_build_info{goversion="` + runtime.Version() + `",version="v1.2.3"} 1`},
		{metrics + "/metrics", 200, "go_goroutines "},
		{metrics + "/metrics", 200, "process_start_time_seconds "},
		{metrics + "/healthz", 404, ""},
		{metrics + "/readyz", 404, ""},
	} {
		code, body := fetch(t, tc.url)
		if code != tc.wantCode || !strings.Contains(body, tc.wantBody) {
			t.Errorf("GET %s: %d, want %d with %q in:\n%s", tc.url, code, tc.wantCode, tc.wantBody, body)
		}
	}

	tel.SyncFinished(apply.SyncResult{})
	if code, body := fetch(t, health+"/readyz"); code != 200 || body != "ok\n" {
		t.Errorf("GET /readyz after a sync: %d %q, want 200 \"ok\\n\"", code, body)
	}
	if _, body := fetch(t, metrics+"/metrics"); !strings.Contains(body, `apiserver_proxy_sidecar_syncs_total{result="success"} 1`) {
		t.Errorf("/metrics after a sync:\n%s", body)
	}
}

func TestStartOff(t *testing.T) {
	for _, addrs := range [][2]string{{"", ""}, {"0", "0"}, {"", "0"}} {
		tel, _ := newTest(time.Minute)
		l := start(t, tel, addrs[0], addrs[1])
		if l.HealthAddr() != nil || l.MetricsAddr() != nil {
			t.Errorf("Start(%q, %q) listens on %v and %v, want nothing", addrs[0], addrs[1], l.HealthAddr(), l.MetricsAddr())
		}
		if err := l.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	}
	tel, _ := newTest(time.Minute)
	if l := start(t, tel, "", "127.0.0.1:0"); l.HealthAddr() != nil || l.MetricsAddr() == nil {
		t.Errorf("metrics only: health on %v, metrics on %v", l.HealthAddr(), l.MetricsAddr())
	}
}

// TestShutdownStops proves that Shutdown returns once both listeners are
// closed: a new connection is refused.
func TestShutdownStops(t *testing.T) {
	tel, _ := newTest(time.Minute)
	l, err := tel.Start("127.0.0.1:0", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// A kept-alive idle connection must not hold Shutdown up.
	fetch(t, "http://"+l.HealthAddr().String()+"/healthz")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for _, a := range []net.Addr{l.HealthAddr(), l.MetricsAddr()} {
		c, err := net.Dial("tcp", a.String())
		if err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after Shutdown", a)
			continue
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dialing %s after Shutdown: %v, want connection refused", a, err)
		}
	}
}

// TestStartRefusesAPortInUse proves that a port another socket holds is an
// error of Start, whichever listener asks for it, and that nothing is left
// listening then.
func TestStartRefusesAPortInUse(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0") // without SO_REUSEPORT
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	busy := held.Addr().String()
	for _, tc := range []struct{ health, metrics, want string }{
		{busy, "", "serving health on " + busy},
		{"", busy, "serving metrics on " + busy},
		{"127.0.0.1:0", busy, "serving metrics on " + busy},
		{"127.0.0.1:bad", "", "serving health on 127.0.0.1:bad"},
	} {
		tel, _ := newTest(time.Minute)
		l, err := tel.Start(tc.health, tc.metrics)
		if err == nil {
			_ = l.Shutdown(context.Background())
			t.Errorf("Start(%q, %q) succeeded, want an error", tc.health, tc.metrics)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Start(%q, %q): %v, want it to say %q", tc.health, tc.metrics, err, tc.want)
		}
		if tc.health == busy || tc.metrics == busy {
			if !errors.Is(err, syscall.EADDRINUSE) {
				t.Errorf("Start(%q, %q): %v, want address in use", tc.health, tc.metrics, err)
			}
		}
	}
}

// TestTwoSidecarsShareAPort proves what a rolling update of the DaemonSet
// needs: a new pod's sidecar listens on the port the old one still holds
// (both set SO_REUSEPORT), and serves alone once the old one has stopped.
func TestTwoSidecarsShareAPort(t *testing.T) {
	oldTel, _ := newTest(time.Minute)
	old, err := oldTel.Start("127.0.0.1:0", "")
	if err != nil {
		t.Fatal(err)
	}
	addr := old.HealthAddr().String()
	newTel, _ := newTest(time.Minute)
	l := start(t, newTel, addr, "")
	if got := l.HealthAddr().String(); got != addr {
		t.Fatalf("the new sidecar listens on %s, want %s", got, addr)
	}
	if err := old.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	newTel.SyncFinished(apply.SyncResult{})
	// Only the new sidecar has synced: every answer must come from it.
	for range 5 {
		if code, body := fetch(t, "http://"+addr+"/readyz"); code != 200 {
			t.Fatalf("GET /readyz after the old sidecar stopped: %d %q", code, body)
		}
	}
}
