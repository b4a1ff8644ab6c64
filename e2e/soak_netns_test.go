package e2e

import (
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// soakDrift is one way the soak test breaks the node's state.
type soakDrift struct {
	name string
	cmd  []string
}

// soakDrifts lists the drifts injected into a node whose iptables rules
// are written with backend. The iptables programs wait for the xtables
// lock (-w), which legacy takes, rather than fail while the sidecar or
// another test holds it.
func soakDrifts(backend string) []soakDrift {
	ipt, ip6t := "iptables-"+backend, "ip6tables-"+backend
	return []soakDrift{
		{"IPv4 filter chain flushed", []string{ipt, "-w", "-t", "filter", "-F", "APISERVER-PROXY-INPUT"}},
		{"IPv4 raw chain flushed", []string{ipt, "-w", "-t", "raw", "-F", "APISERVER-PROXY-OUTPUT"}},
		{"IPv6 filter chain flushed", []string{ip6t, "-w", "-t", "filter", "-F", "APISERVER-PROXY-OUTPUT"}},
		{"IPv4 raw jump deleted", []string{ipt, "-w", "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING"}},
		{"IPv6 filter jump deleted", []string{ip6t, "-w", "-t", "filter", "-D", "INPUT", "-j", "APISERVER-PROXY-INPUT"}},
		{"IPv4 address deleted", []string{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"}},
		{"IPv6 address deleted", []string{"ip", "addr", "del", "fd00::2/128", "dev", "lo"}},
		{"IPv4 filter chain given an extra rule", []string{ipt, "-w", "-t", "filter", "-A", "APISERVER-PROXY-INPUT", "-s", "192.0.2.66/32", "-j", "DROP"}},
		{"IPv6 raw chain given an extra rule", []string{ip6t, "-w", "-t", "raw", "-I", "APISERVER-PROXY-OUTPUT", "-p", "udp", "-j", "NOTRACK"}},
		{"IPv4 rule deleted from our chain", []string{ipt, "-w", "-t", "raw", "-D", "APISERVER-PROXY-OUTPUT", "1"}},
		{"IPv4 filter jump duplicated", []string{ipt, "-w", "-t", "filter", "-I", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"}},
		{"IPv6 raw jump duplicated", []string{ip6t, "-w", "-t", "raw", "-A", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"}},
	}
}

// TestSoak runs the race-built daemon (dual-stack, --sync-interval 1s,
// metrics on) for SOAK_DURATION, half of it with each backend, and breaks
// its state at random every one to four seconds. Every drift must be
// repaired, the state must stay whole between drifts, and at the end it
// must be exactly the desired one, with resident memory, Go heap and
// goroutines no higher than after warm-up (within a tolerance) and no
// failed sync.
// SOAK_SEED repeats a run's sequence of drifts. Without SOAK_DURATION
// (`make test`) it skips; `make soak` sets it.
func TestSoak(t *testing.T) {
	total := os.Getenv("SOAK_DURATION")
	if total == "" {
		t.Skip("skipping: SOAK_DURATION is not set (run `make soak`, or `make soak SOAK_DURATION=60s`)")
	}
	dur, err := time.ParseDuration(total)
	if err != nil || dur <= 0 {
		t.Fatalf("SOAK_DURATION=%q: want a positive duration such as 10m (%v)", total, err)
	}
	netnstest.Require(t)
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SOAK_SEED"); s != "" {
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("SOAK_SEED=%q: %v", s, err)
		}
	}
	t.Logf("soaking for %s; seed %d (SOAK_SEED=%d repeats these drifts)", dur, seed, seed)
	bin := sidecarBinary(t)
	for i, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			soak(t, bin, backend, dur/2, rand.New(rand.NewPCG(seed, uint64(i))))
		})
	}
}

// soakSample is what /metrics says about the process at one moment.
type soakSample struct {
	rss, heap, goroutines float64
}

func soak(t *testing.T, bin, backend string, dur time.Duration, rng *rand.Rand) {
	ns := netnstest.New(t)
	d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend,
		"--sync-interval", "1s", "--metrics-bind-address", metricsAddr, "-v", "2")
	want := wantState(t, backend)
	whole := func() bool { return slices.Equal(ourState(t, ns, backend), want) }
	sample := func() soakSample {
		m := scrape(t, ns, metricsAddr)
		return soakSample{
			rss:        m.must(t, series{name: "process_resident_memory_bytes"}),
			heap:       m.must(t, series{name: "go_memstats_heap_inuse_bytes"}),
			goroutines: m.must(t, series{name: "go_goroutines"}),
		}
	}
	start := time.Now()
	eventually(t, "first sync", whole)
	// Each drift's repair is counted in the log: none of the start-up's.
	d.startupSynced(t)
	metricsServed(t, ns, metricsAddr)

	drifts := soakDrifts(backend)
	end, warmUpEnd := start.Add(dur), start.Add(dur/5)
	var (
		warm      *soakSample
		latencies []time.Duration
		injected  = map[string]int{}
	)
	for time.Now().Before(end) {
		if warm == nil && !time.Now().Before(warmUpEnd) {
			s := sample()
			warm = &s
		}
		dr := drifts[rng.IntN(len(drifts))]
		repairs := strings.Count(d.log(), "Repaired")
		ns.Run(t, dr.cmd[0], dr.cmd[1:]...)
		injected[dr.name]++
		// The latency is until the daemon logs its repair, polled cheaply;
		// then the state must be whole.
		took := time.Now()
		eventually(t, dr.name+" repaired", func() bool {
			return strings.Count(d.log(), "Repaired") > repairs
		})
		latencies = append(latencies, time.Since(took))
		eventually(t, "whole after "+dr.name, whole)
		// Until the next drift, one to four seconds later, the state
		// stays whole: a repair that flaps would show here.
		next := time.Now().Add(time.Second + time.Duration(rng.Int64N(int64(3*time.Second))))
		for time.Now().Before(next) && time.Now().Before(end) {
			if got := ourState(t, ns, backend); !slices.Equal(got, want) {
				t.Fatalf("after %s was repaired, the state changed again by itself:\n%q\nwant:\n%q", dr.name, got, want)
			}
			time.Sleep(250 * time.Millisecond) // the pace of the drifts, not a synchronisation
		}
	}
	if warm == nil {
		t.Fatal("the soak ended before warm-up: SOAK_DURATION is too short")
	}
	if got := ourState(t, ns, backend); !slices.Equal(got, want) {
		t.Fatalf("at the end of the soak:\n%q\nwant:\n%q", got, want)
	}
	last := sample()
	m := scrape(t, ns, metricsAddr)

	var names []string
	for n := range injected {
		names = append(names, n)
	}
	slices.Sort(names)
	var perDrift []string
	for _, n := range names {
		perDrift = append(perDrift, n+": "+strconv.Itoa(injected[n]))
	}
	sorted := slices.Clone(latencies)
	slices.Sort(sorted)
	syncsOK := m.must(t, syncSuccesses)
	syncsFailed := m.must(t, syncFailures)
	repaired := m.must(t, series{name: "apiserver_proxy_sidecar_repairs_total"})
	t.Logf("%s soak for %s: %.0f syncs (%.0f failed), %d drifts injected and %d repaired (%.0f objects repaired); repair latency median %v, max %v",
		backend, time.Since(start).Round(time.Second), syncsOK+syncsFailed, syncsFailed, len(latencies), len(latencies), repaired,
		sorted[len(sorted)/2].Round(time.Millisecond), sorted[len(sorted)-1].Round(time.Millisecond))
	t.Logf("drifts injected: %s", strings.Join(perDrift, "; "))
	t.Logf("after warm-up and at the end: resident memory %.1f and %.1f MiB, Go heap in use %.1f and %.1f MiB, goroutines %.0f and %.0f",
		warm.rss/(1<<20), last.rss/(1<<20), warm.heap/(1<<20), last.heap/(1<<20), warm.goroutines, last.goroutines)

	if syncsFailed != 0 {
		t.Errorf("%.0f syncs failed during the soak", syncsFailed)
	}
	if repaired < float64(len(latencies)) {
		t.Errorf("repairs_total is %.0f for %d drifts", repaired, len(latencies))
	}
	// Resident memory may settle a little after warm-up (the race
	// detector's own memory grows slowly), but not keep growing with each
	// drift.
	if limit := max(warm.rss*1.25, warm.rss+16<<20); last.rss > limit {
		t.Errorf("resident memory grew from %.1f MiB after warm-up to %.1f MiB (limit %.1f MiB)", warm.rss/(1<<20), last.rss/(1<<20), limit/(1<<20))
	}
	// The Go heap is where a leak of the sidecar's own would show, free of
	// the race detector's memory: it may only vary between collections.
	if limit := max(warm.heap*1.5, warm.heap+4<<20); last.heap > limit {
		t.Errorf("Go heap in use grew from %.1f MiB after warm-up to %.1f MiB (limit %.1f MiB)", warm.heap/(1<<20), last.heap/(1<<20), limit/(1<<20))
	}
	// A sync in progress at either sample runs a few goroutines of its own.
	if last.goroutines > warm.goroutines+5 {
		t.Errorf("goroutines grew from %.0f after warm-up to %.0f", warm.goroutines, last.goroutines)
	}
	if code := d.stop(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}
