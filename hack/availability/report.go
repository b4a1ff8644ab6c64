package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// result is one scenario on one backend.
type result struct {
	Backend   string
	Scenario  scenario
	Detail    string
	Elapsed   time.Duration
	PathNames []string
	Paths     []pathStats
	// Repairs and Errors are what the sidecar's instances logged in the
	// window.
	Repairs, Errors int
	// Changes counts the changes to the ruleset and the addresses the
	// kernel reported in the window (nft monitor, ip monitor address);
	// -1 where the rules cannot be watched (legacy).
	Changes int
}

// served are the stats of the paths through the sidecar: every path but
// the control, the last.
func (r result) served() []pathStats {
	return r.Paths[:len(r.Paths)-1]
}

func (r result) control() pathStats {
	return r.Paths[len(r.Paths)-1]
}

func (r result) attempted() (n int) {
	for _, p := range r.served() {
		n += p.Attempted
	}
	return n
}

func (r result) failed() (n int) {
	for _, p := range r.served() {
		n += p.Failed
	}
	return n
}

// inStall is how many of failed overlapped a failure of the control.
func (r result) inStall() (n int) {
	for _, p := range r.served() {
		n += p.InStall
	}
	return n
}

// late is how many of failed the kernel had answered in time: the
// measuring process ran late.
func (r result) late() (n int) {
	for _, p := range r.served() {
		n += p.Late
	}
	return n
}

// own is how many of failed were neither in a stall nor late.
func (r result) own() (n int) {
	for _, p := range r.served() {
		n += p.Own
	}
	return n
}

func (r result) skipped() (n int) {
	for _, p := range r.Paths {
		n += p.Skipped
	}
	return n
}

// maxGap is the longest gap of any path through the sidecar.
func (r result) maxGap() (g time.Duration) {
	for _, p := range r.served() {
		g = max(g, p.MaxGap)
	}
	return g
}

// stalled says, where the control path failed too, that the machine
// stalled the measurement itself.
func (r result) stalled() string {
	if c := r.control(); c.Failed > 0 && r.Scenario.flushesControl {
		return fmt.Sprintf(" (the node's own rules, the lo and control accepts among them, are gone until put back right after the flush: the control failed %d times, longest gap %s, and the node's paths wait for that too)", c.Failed, ms(c.MaxGap))
	} else if c.Failed > 0 {
		return fmt.Sprintf(" (the control failed %d times too, longest gap %s: the machine stalled the measurement)", c.Failed, ms(c.MaxGap))
	}
	return ""
}

func (r result) summary() string {
	s := fmt.Sprintf("%d attempted, %d failed, longest gap %s; the sidecar logged %d repairs, %d errors", r.attempted(), r.failed(), ms(r.maxGap()), r.Repairs, r.Errors)
	if e := r.firstErr(); e != "" {
		s += "; first error: " + e
	}
	return s
}

// maxFailureLines bounds the failed attempts logged per scenario.
const maxFailureLines = 40

// failureLines describes up to max failed attempts, in the order they
// started, on every path: when (from t0), how late the connect was
// issued, how long until the client gave up, its error and the kernel's
// view of its socket.
func (r result) failureLines(t0 time.Time, max int) []string {
	type line struct {
		from time.Time
		text string
	}
	var lines []line
	for i, p := range r.Paths {
		for _, f := range p.failures {
			connect := "never issued"
			if f.connectAfter >= 0 {
				connect = "issued after " + ms(f.connectAfter)
			}
			lines = append(lines, line{f.from, fmt.Sprintf("%s at +%s: connect %s, gave up after %s: %s; %s",
				r.PathNames[i], ms(f.from.Sub(t0)), connect, ms(f.to.Sub(f.from)), f.err, f.why)})
		}
	}
	sort.Slice(lines, func(a, b int) bool { return lines[a].from.Before(lines[b].from) })
	var out []string
	for i, l := range lines {
		if i == max {
			out = append(out, fmt.Sprintf("... and %d more", len(lines)-max))
			break
		}
		out = append(out, l.text)
	}
	return out
}

// Targets.
const (
	nftGapTarget    = 100 * time.Millisecond
	legacyGapTarget = 300 * time.Millisecond
)

func gapTarget(backend string) time.Duration {
	if backend == "legacy" {
		return legacyGapTarget
	}
	return nftGapTarget
}

// verdict says whether r met its target, and if not why.
func (r result) verdict() string {
	switch r.Scenario.Kind {
	case lifecycle, storm:
		// Nothing of these touches the node's own rules the control goes
		// through: a failure overlapping one of the control's is the
		// machine stalling, and does not count against the sidecar.
		switch own := r.own(); {
		case r.failed() == 0:
			return "met: 0 failed"
		case own == 0:
			return fmt.Sprintf("met: 0 failed but %d the machine's: %s", r.failed(), r.machineShare())
		case r.Changes == 0:
			return fmt.Sprintf("met: 0 failed but %d attempts timed out while neither the ruleset nor an address changed at all (0 events from nft monitor and ip monitor): the machine's scheduling", r.failed())
		default:
			return fmt.Sprintf("**missed**: %d failed, %d of them neither during stalls nor answered late (%s)", r.failed(), own, r.firstOwnErr())
		}
	case external:
		t := gapTarget(r.Backend)
		if r.maxGap() <= t {
			return "met: ≤ " + ms(t)
		}
		if c := r.control(); c.MaxGap > t && !r.Scenario.flushesControl && !(r.Backend == "legacy" && r.maxGap() > 2*c.MaxGap) {
			return fmt.Sprintf("not measured (≤ %s): the control, which nothing here touches, went %s without a success itself: the machine stalled the measurement", ms(t), ms(c.MaxGap))
		}
		return fmt.Sprintf("**missed** (≤ %s): see the note below the table%s", ms(t), r.stalled())
	default:
		return "none (a gap is expected)"
	}
}

// machineShare says which of the failed attempts were the machine's:
// during stalls that failed the control too, or answered in time by the
// kernel while the measuring process ran late.
func (r result) machineShare() string {
	var parts []string
	if n := r.inStall(); n > 0 {
		parts = append(parts, fmt.Sprintf("%d during stalls that failed the control %d times", n, r.control().Failed))
	}
	if n := r.failed() - r.inStall() - r.own(); n > 0 {
		parts = append(parts, fmt.Sprintf("%d answered in time by the kernel, the measuring process late", n))
	}
	return strings.Join(parts, ", ")
}

// firstOwnErr is the first failure held against the sidecar, with the
// kernel's view of its socket.
func (r result) firstOwnErr() string {
	var first *failure
	name := ""
	for i, p := range r.served() {
		for j, f := range p.failures {
			if !f.late && (first == nil || f.from.Before(first.from)) && !r.overlapsControl(f) {
				first, name = &p.failures[j], r.PathNames[i]
			}
		}
	}
	if first == nil {
		return r.firstErr()
	}
	return name + ": " + first.err + ": " + first.why
}

// overlapsControl says whether f overlapped a failure of the control.
func (r result) overlapsControl(f failure) bool {
	for _, c := range r.control().failures {
		if f.from.Before(c.to) && c.from.Before(f.to) {
			return true
		}
	}
	return false
}

func (r result) firstErr() string {
	for i, p := range r.served() {
		if p.FirstErr != "" {
			return r.PathNames[i] + ": " + p.FirstErr
		}
	}
	return ""
}

// defaultTCPWait is how long a client with TCP's default behaviour would
// wait in the worst case through an outage of gap that failed attempts:
// its SYN, dropped at the start of the outage, is sent again 1 s, 3 s,
// 7 s, 15 s, ... after the first (initial RTO 1 s, doubling), and the first
// of those at or after the outage's end gets through. Without a failed
// attempt there was no outage to wait through.
func defaultTCPWait(gap time.Duration, failed int) time.Duration {
	if failed == 0 {
		return 0
	}
	wait, rto := time.Duration(0), time.Second
	for wait < gap {
		wait += rto
		rto *= 2
	}
	return wait
}

// report is the whole run.
type report struct {
	Plan               plan
	Started            time.Time
	Elapsed            time.Duration
	LoadStart, LoadEnd string
	Machine            [][2]string
	Results            []result
}

// lifecycleMissed lists the lifecycle scenarios where a connection failed.
func (rep *report) lifecycleMissed() []string {
	var out []string
	for _, r := range rep.Results {
		if own := r.own(); r.Scenario.Kind == lifecycle && own > 0 && r.Changes != 0 {
			out = append(out, fmt.Sprintf("%s, %s: %d failed neither during stalls of the machine nor answered late (%s)", r.Backend, r.Scenario.Name, own, r.firstOwnErr()))
		}
	}
	return out
}

// table is the one table: a row per scenario and backend, failed attempts
// and the longest gap per path.
func (rep *report) table() string {
	var b strings.Builder
	var names []string
	if len(rep.Results) > 0 {
		names = append([]string(nil), rep.Results[0].PathNames...)
		names[len(names)-1] = "control (pod → node:8080)"
	}
	b.WriteString("| backend | scenario | events | attempted | failed |")
	for _, n := range names {
		b.WriteString(" " + n + " |")
	}
	b.WriteString(" default-TCP client waits | target |\n|" + strings.Repeat(" --- |", 7+len(names)) + "\n")
	for _, r := range rep.Results {
		fmt.Fprintf(&b, "| %s | %s | %d | %d | %d |", r.Backend, r.Scenario.Name, r.Scenario.Events, r.attempted(), r.failed())
		for _, p := range r.Paths {
			fmt.Fprintf(&b, " %d / %s |", p.Failed, ms(p.MaxGap))
		}
		wait := "none"
		if w := defaultTCPWait(r.maxGap(), r.failed()); w > 0 {
			wait = "up to " + w.String()
		}
		fmt.Fprintf(&b, " %s | %s |\n", wait, r.verdict())
	}
	return b.String()
}

func (rep *report) markdown() string {
	var b strings.Builder
	p := rep.Plan
	b.WriteString("# Availability: what clients feel\n\n")
	b.WriteString("Written by `make availability` (`go run ./hack/availability`); do not edit by hand.\n")
	if p.Short {
		b.WriteString("This is the **short** form (`-short`, `QUICK=1`): fewer repetitions and a shorter storm.\n")
	}
	fmt.Fprintf(&b, "\nRun %s, %s in all; load average at start `%s`, at end `%s`.\n\n",
		rep.Started.UTC().Format("2006-01-02 15:04 MST"), rep.Elapsed.Round(time.Second), rep.LoadStart, rep.LoadEnd)
	b.WriteString("| machine | |\n| --- | --- |\n")
	for _, kv := range rep.Machine {
		fmt.Fprintf(&b, "| %s | %s |\n", kv[0], kv[1])
	}
	fmt.Fprintf(&b, `
## Results

Each path cell is *failed attempts / longest gap between two successful
connections*; *attempted* and *failed* add up the four paths through the
sidecar. An attempt starts every %s on each path (about %d connections a
second in all, the control included), each on a worker of its own: a
connect, %d bytes echoed and a close within a %s timeout. Attempts do not
wait for each other, so an outage of G ms shows as a gap of about G ms
plus up to one interval whatever the timeout, and as about G / %s failed
attempts. The control path (a pod to a port on the node's own address
that the node's firewall accepts, tracked) goes through nothing of the
sidecar's: where it fails too, the machine stalled the measurement.

`, p.Interval, 5*int(time.Second/p.Interval), len("availability ping"), p.Timeout, p.Interval)
	b.WriteString(rep.table())
	b.WriteString("\n")
	for _, r := range rep.Results {
		notes := []string{fmt.Sprintf("the sidecar logged %d repairs and %d errors", r.Repairs, r.Errors)}
		if r.Changes >= 0 {
			notes = append(notes, fmt.Sprintf("the kernel reported %d changes to the ruleset and the addresses", r.Changes))
		}
		if r.Detail != "" {
			notes = append(notes, r.Detail)
		}
		if s := r.skipped(); s > 0 {
			notes = append(notes, fmt.Sprintf("%d attempts not started on time (every worker busy)", s))
		}
		if n := r.late(); n > 0 {
			notes = append(notes, fmt.Sprintf("%d of the %d failed attempts answered in time by the kernel, the measuring process late", n, r.failed()))
		}
		if e := r.firstErr(); e != "" {
			notes = append(notes, "first error: "+e)
		}
		{
			fmt.Fprintf(&b, "- %s, %s (%s): %s.\n", r.Backend, r.Scenario.Name, r.Elapsed.Round(100*time.Millisecond), strings.Join(notes, "; "))
		}
	}
	fmt.Fprintf(&b, `
## Method

- **The node.** A network namespace with the filter INPUT policy DROP,
  accepting only lo and ESTABLISHED,RELATED, as distributions' firewalls
  do; kube-proxy's iptables-mode DNAT of the `+"`kubernetes`"+` Service's
  ClusterIP %[1]s:443 to the proxy's address %[2]s:443 in nat; an echo
  server standing for haproxy on both addresses (bound with IP_FREEBIND);
  the sidecar's daemon with `+"`--ip-address=%[2]s,%[1]s --setup-iptables`"+`
  (interception), with the default `+"`--sync-interval`"+` (1m) on both
  backends: changes to nft rules are seen as events, changes to legacy
  tables by polling their info, and the address is watched through
  netlink.
- **The clients.** In-process, from a "pod" namespace joined to the node
  by a veth and from the node itself, to the proxy's address directly and
  to the ClusterIP: four paths. Every attempt is a fresh connection; it
  closes with a reset so that minutes of them leave no TIME_WAIT behind.
  One thread per namespace creates the sockets (a socket stays in the
  namespace it was created in); the attempts run on ordinary goroutines.
- **The gap** is the longest time between two successful attempts'
  completions on a path, measured until every path has had %[4]d
  successes in a row after the last event. An attempt counts in the
  scenario it started in: a window closes once every attempt started in
  it has ended.
- **A default-TCP client** does not give up after %[5]s: its dropped SYN
  is sent again 1 s, 3 s, 7 s, ... after the first. The column gives the
  first of those at or after the longest gap, where an attempt failed:
  what a client that connected at the worst moment would wait.
- **Scenarios**, one at a time, the clients running throughout:
  - *SIGKILL, restart at once*: the sidecar killed at a random point from
    0 to 1 s after its start (start-up and first sync included), and
    started again at once, %[6]d times.
  - *rolling update*: a second instance started, once it has logged its
    first sync the first one stopped with SIGTERM, without `+"`--cleanup`"+`,
    %[7]d times; then the same with `+"`--cleanup`"+` on the instance stopped,
    waiting for every path to recover between updates.
  - *external faults*, %[8]d times each at a random point of a %[3]s
    cycle: `+"`iptables -F APISERVER-PROXY-INPUT`"+`; `+"`iptables -D INPUT -j APISERVER-PROXY-INPUT`"+`;
    `+"`iptables -F INPUT`"+` (the node's own two rules put back right after,
    as its firewall would: a client on the node needs its accept of lo
    whatever the sidecar does); `+"`iptables-restore`"+` of the filter table
    saved before the sidecar started, without `+"`--noflush`"+` (what a
    firewalld reload or netfilter-persistent does); `+"`ip addr del`"+` of
    both addresses.
  - *writer storm*: a kube-proxy-shaped writer rewriting 10,000 rules in
    nat and filter (its own chains whole, and rules inserted at the top
    and appended in the built-in chains) in 4 batches of
    `+"`iptables-restore --noflush`"+`, 100 ms apart, for %[9]s.
- **Targets**: 0 failed connections through every lifecycle event (kill,
  restart, update without `+"`--cleanup`"+`) on both backends, the one `+"`make availability`"+`
  asserts (exit 1); longest gap after an external fault ≤ 100 ms with nft
  and ≤ 300 ms with legacy; no failed connection during the storm.
- **What a failure is blamed on.** A lifecycle or storm attempt that
  failed while an attempt of the control failed too is put down to the
  machine stalling (*during stalls*). On nft, `+"`nft monitor`"+` and
  `+"`ip monitor address`"+` count every change to the ruleset and the addresses in the
  node, whoever made it: a lifecycle window in which neither changed at
  all had the same packet path throughout, and its failed attempts are put
  down to the machine's scheduling too (a worker's thread not run for a
  whole timeout on a loaded machine; the control, with a quarter of the
  attempts, does not always catch it). When an attempt fails, its
  socket's state is read back from the kernel (TCP_INFO) as the client
  gives up: where the SYN had been answered and, if the bytes had been
  written, acknowledged, with nothing lost or sent again (a dropped SYN
  is sent again only after 1 s), the path was open and the client or the
  echo server, both in the measuring process, was not run in time
  (*answered late*). All of these are shown, never hidden; on
  legacy the rules cannot be watched and only the control counts. A gap
  target is *not measured* where the control itself went longer than the
  target without a success in the same window.
`, clusterIP, proxyAddr, faultCycle, healthyStreak, p.Timeout, p.Kills, p.Updates, p.Faults, p.Storm)
	return b.String()
}

// ms formats d in milliseconds.
func ms(d time.Duration) string {
	return fmt.Sprintf("%d ms", d.Round(time.Millisecond).Milliseconds())
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// machine describes where the run took place.
func machine(ctx context.Context, bin string) [][2]string {
	kernel := "unknown"
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		kernel = unix.ByteSliceToString(u.Release[:])
	}
	version := func(name string, args ...string) string {
		out, err := exec.CommandContext(ctx, name, args...).Output()
		if err != nil {
			return "unknown"
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	return [][2]string{
		{"CPUs", fmt.Sprint(runtime.NumCPU())},
		{"kernel", kernel},
		{"iptables", version("iptables-nft", "--version") + "; " + version("iptables-legacy", "--version")},
		{"sidecar", version(bin, "--version")},
		{"Go", runtime.Version()},
	}
}
