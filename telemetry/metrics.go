// Package telemetry makes what the sidecar does visible: it is an
// apply.Observer that keeps Prometheus metrics and the state behind the
// health endpoints, and it serves /healthz and /readyz (for the kubelet's
// probes) and /metrics (for Prometheus) on listeners of their own.
//
// Metrics live in a registry of their own, never in the process-wide
// default one, and are named under the prefix apiserver_proxy_sidecar_ in
// the style of kube-proxy's (kubeproxy_sync_proxy_rules_*).
package telemetry

import (
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/utils/clock"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/apply"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Namespace prefixes every metric's name.
const Namespace = "apiserver_proxy_sidecar"

// LivenessSlack is what /healthz allows between two syncs on top of two
// sync intervals: room for a sync's bounded iptables calls.
const LivenessSlack = time.Minute

// syncResults are the values of syncs_total's result label, set up front
// with the apply package's lists of objects, triggers and skip reasons, so
// that every series exists (at 0) from the start: a rate or an alert needs
// no special case for "never happened".
var syncResults = []string{"success", "failure"}

// Options configure a Telemetry.
type Options struct {
	// SyncInterval is the sidecar's --sync-interval: /healthz fails once
	// no sync has finished for 2*SyncInterval + LivenessSlack.
	SyncInterval time.Duration
	// Version is the sidecar's version, reported by build_info.
	Version string
	// Clock tells the time; nil means the real clock.
	Clock clock.PassiveClock
}

// Telemetry observes the sidecar (it implements apply.Observer) and serves
// what it saw. Its methods are safe for concurrent use.
type Telemetry struct {
	clock    clock.PassiveClock
	started  time.Time
	liveness time.Duration
	registry *prometheus.Registry

	syncs             *prometheus.CounterVec
	syncDuration      prometheus.Histogram
	lastSuccess       prometheus.Gauge
	repairs           *prometheus.CounterVec
	restores          *prometheus.CounterVec
	restoreFailures   *prometheus.CounterVec
	lockWaits         *prometheus.CounterVec
	backendInfo       *prometheus.GaugeVec
	verifications     *prometheus.CounterVec
	verificationsSkip *prometheus.CounterVec
	ready             prometheus.Gauge
	untrackedDNAT     *prometheus.CounterVec

	mu sync.Mutex
	// lastSync is when the latest sync finished; zero before the first.
	lastSync time.Time
	// latest is the latest sync's result.
	latest apply.SyncResult
	// backends is the backend in use per family, for backendInfo.
	backends map[render.Family]apply.Backend
}

var _ apply.Observer = (*Telemetry)(nil)

// New returns a Telemetry with every metric registered, including the Go
// runtime's and the process's.
func New(o Options) *Telemetry {
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	t := &Telemetry{
		clock:    o.Clock,
		started:  o.Clock.Now(),
		liveness: 2*o.SyncInterval + LivenessSlack,
		registry: prometheus.NewRegistry(),
		backends: map[render.Family]apply.Backend{},
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "syncs_total",
			Help: "Syncs of the address and the rules, by result: failure when anything was not in place at the end of the sync.",
		}, []string{"result"}),
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: Namespace, Name: "sync_duration_seconds",
			Help:    "How long a sync took, repairs included.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15), // 1ms .. 16s, as kube-proxy's sync latency
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "last_successful_sync_timestamp_seconds",
			Help: "When the latest successful sync finished, in seconds since the Unix epoch; 0 before the first.",
		}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "repairs_total",
			Help: "Objects found missing or drifted and put back, by object: address, link, chain or jump.",
		}, []string{"object"}),
		restores: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "iptables_restore_total",
			Help: "iptables-restore runs, by address family.",
		}, []string{"family"}),
		restoreFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "iptables_restore_failures_total",
			Help: "iptables-restore runs that failed, by address family; the lock waits among them too.",
		}, []string{"family"}),
		lockWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "xtables_lock_waits_total",
			Help: "iptables-restore runs that gave up waiting for the xtables lock another process held, by address family.",
		}, []string{"family"}),
		backendInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "iptables_backend_info",
			Help: "The iptables backend in use, by address family: 1 for the backend in use, no series for the other.",
		}, []string{"family", "backend"}),
		verifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "verifications_total",
			Help: "Syncs started, by trigger: startup, interval, a kernel event (address_event, link_event, nftables_event), a change polling found in a legacy iptables table (legacy_change), or the retry of a failed sync (retry).",
		}, []string{"trigger"}),
		verificationsSkip: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "verifications_skipped_total",
			Help: "Reads of a family's rules skipped because nothing can have changed, by reason.",
		}, []string{"reason"}),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Name: "ready",
			Help: "1 while /readyz would answer 200 (the latest sync succeeded), else 0.",
		}),
		untrackedDNAT: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Name: "untracked_dnat_connections_total",
			Help: "Connections DNATed from destination (a Service ClusterIP, say) to one of our addresses, address, whose replies our rules untrack, so that they fail; seen in conntrack. Fix: list destination in --ip-address too, or run without --setup-iptables.",
		}, []string{"destination", "address"}),
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "build_info",
		Help: "The sidecar's version and the Go version it was built with; always 1.",
	}, []string{"version", "goversion"})
	build.WithLabelValues(o.Version, runtime.Version()).Set(1)

	t.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		build,
		t.syncs, t.syncDuration, t.lastSuccess, t.repairs,
		t.restores, t.restoreFailures, t.lockWaits, t.backendInfo,
		t.verifications, t.verificationsSkip, t.ready, t.untrackedDNAT,
	)
	for _, vs := range []struct {
		vec    *prometheus.CounterVec
		values []string
	}{{t.syncs, syncResults}, {t.repairs, labels(apply.Objects)}, {t.verifications, labels(apply.Triggers)}, {t.verificationsSkip, labels(apply.SkipReasons)}} {
		for _, v := range vs.values {
			vs.vec.WithLabelValues(v)
		}
	}
	return t
}

// Registry is the registry every metric is in.
func (t *Telemetry) Registry() *prometheus.Registry { return t.registry }

// SyncFinished implements apply.Observer.
func (t *Telemetry) SyncFinished(r apply.SyncResult) {
	now := t.clock.Now()
	t.syncDuration.Observe(r.Duration.Seconds())
	if r.Err() != nil {
		t.syncs.WithLabelValues("failure").Inc()
		t.ready.Set(0)
	} else {
		t.syncs.WithLabelValues("success").Inc()
		t.lastSuccess.Set(float64(now.UnixNano()) / 1e9)
		t.ready.Set(1)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lastSync, t.latest = now, r
}

// labels turns the apply package's typed values into label values.
func labels[T ~string](values []T) []string {
	out := make([]string, len(values))
	for i, v := range values {
		out[i] = string(v)
	}
	return out
}

// Repaired implements apply.Observer.
func (t *Telemetry) Repaired(o apply.Object) { t.repairs.WithLabelValues(string(o)).Inc() }

// RestoreRan implements apply.Observer.
func (t *Telemetry) RestoreRan(f render.Family, err error) {
	family := f.String()
	t.restores.WithLabelValues(family).Inc()
	if err != nil {
		t.restoreFailures.WithLabelValues(family).Inc()
	}
	if apply.IsLockHeld(err) {
		t.lockWaits.WithLabelValues(family).Inc()
	}
}

// BackendChosen implements apply.Observer. The family's series for the
// backend it used before, if any, goes away.
func (t *Telemetry) BackendChosen(f render.Family, b apply.Backend) {
	family := f.String()
	// A family that writes rules has its restore series from now on.
	t.restores.WithLabelValues(family)
	t.restoreFailures.WithLabelValues(family)
	t.lockWaits.WithLabelValues(family)

	t.mu.Lock()
	defer t.mu.Unlock()
	if old, ok := t.backends[f]; ok && old != b {
		t.backendInfo.DeleteLabelValues(family, string(old))
	}
	t.backends[f] = b
	t.backendInfo.WithLabelValues(family, string(b)).Set(1)
}

// Verification counts a sync that starts, by trigger. It implements
// apply.Observer.
func (t *Telemetry) Verification(trigger apply.Trigger) {
	t.verifications.WithLabelValues(string(trigger)).Inc()
}

// VerificationSkipped counts a family's rules not read because nothing can
// have changed; reason is "generation_unchanged" (nft) or "legacy_unchanged"
// (the legacy tables' info). It implements
// apply.Observer.
func (t *Telemetry) VerificationSkipped(reason apply.SkipReason) {
	t.verificationsSkip.WithLabelValues(string(reason)).Inc()
}

// UntrackedDNAT implements apply.Observer.
func (t *Telemetry) UntrackedDNAT(original, to netip.AddrPort, n int) {
	t.untrackedDNAT.WithLabelValues(original.String(), to.String()).Add(float64(n))
}
