// Command bench compares the sidecar with the two designs operators
// otherwise run: checking each rule with `iptables -C` (the earlier upstream
// sidecar, node-local-dns), and reading whole tables with `iptables-save`.
// It measures every contender in network namespaces of its own, with real
// iptables of both backends and up to 50,000 foreign rules, and writes one
// markdown table with the figures, a check of the targets and the method.
// It also measures the client paths: a pod's connections to the
// `kubernetes` Service's ClusterIP through kube-proxy's DNAT, against the
// same connections intercepted by the sidecar (clients.go).
//
// Run it through `make bench` (root: it creates network namespaces). It
// never changes the host's network namespace, and deletes every namespace
// it created at the end, on error and on SIGINT or SIGTERM.
//
// Two modes of this binary are the baselines (see baseline.go): they are
// started exactly as the sidecar is, and pay the same Go start-up cost.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"
)

const notRootMsg = "make bench needs root: it creates network namespaces (run: sudo make bench)"

func main() {
	if len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "baseline-") {
		switch os.Args[1] {
		case "baseline-percheck", "baseline-save":
			os.Exit(baselineMain(os.Args[1], os.Args[2:]))
		}
		fmt.Fprintf(os.Stderr, "bench: unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
	os.Exit(benchMain(os.Args[1:]))
}

func benchMain(args []string) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	bin := fs.String("bin", "./apiserver-proxy-sidecar", "the sidecar binary (make build)")
	out := fs.String("out", "BENCHMARKS.md", "where to write the report")
	quick := fs.Bool("quick", false, "3 scenarios, fewer repetitions and syncs, client paths on nft only (bound: 3 min instead of 9)")
	only := fs.String("backend", "", "run only the scenarios and client paths of this backend: nft or legacy (default: both)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *only != "" && *only != "nft" && *only != "legacy" {
		fmt.Fprintf(os.Stderr, "bench: -backend %q: must be nft or legacy\n", *only)
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, notRootMsg)
		return 2
	}
	if missing := missingPrograms(exec.LookPath, requiredPrograms); len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "bench: missing from PATH: %s (apt-get install -y iptables iproute2)\n", strings.Join(missing, ", "))
		return 2
	}
	binPath, err := filepath.Abs(*bin)
	if err == nil {
		_, err = os.Stat(binPath)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: the sidecar binary: %v (run: make build)\n", err)
		return 2
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	if p, err := exec.LookPath("true"); err == nil {
		truePath = p
	}

	p := newPlan(*quick).only(*only)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, p.Bound)
	defer cancel()

	// A private xtables lock for everything started here: the machine's
	// /run/xtables.lock may be held by anyone, which would time everyone
	// waiting for it instead of the work. All contenders use the same one.
	env, removeLock := nsrun.PrivateXtablesLock("apbench")
	defer removeLock()

	h := newHarness(env)
	doc, runErr := run(ctx, h, binPath, self, p)
	if code, ok := nsrun.Outcome(ctx, "bench", p.Bound, runErr, h.Cleanup()); !ok {
		return code
	}
	if err := os.WriteFile(*out, []byte(doc), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	fmt.Print(doc)
	fmt.Fprintf(os.Stderr, "bench: wrote %s\n", *out)
	return 0
}

var requiredPrograms = []string{
	"ip", "iptables",
	"iptables-nft", "iptables-nft-save", "iptables-nft-restore",
	"iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore",
}

// missingPrograms returns the names lookPath cannot find.
func missingPrograms(lookPath func(string) (string, error), names []string) []string {
	var missing []string
	for _, n := range names {
		if _, err := lookPath(n); err != nil {
			missing = append(missing, n)
		}
	}
	return missing
}

// run measures every scenario of p and returns the report.
func run(ctx context.Context, h *harness, bin, self string, p plan) (string, error) {
	started := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%5.1fs] "+format+"\n", append([]any{time.Since(started).Seconds()}, args...)...)
	}
	b := &bench{h: h, bin: bin, self: self, plan: p, log: logf}
	ts, err := openTaskstats()
	if err != nil {
		logf("taskstats unavailable (%v): CPU and memory from wait4's rusage, approximate", err)
	} else {
		b.ts = ts
		defer ts.close()
	}
	mach := machine(ctx)
	var results []scenarioResult
	for _, sc := range p.Scenarios {
		logf("scenario: %s", sc)
		r, err := b.scenario(ctx, sc)
		if err != nil {
			return "", fmt.Errorf("%s: %w", sc, err)
		}
		results = append(results, r)
	}
	var clients []clientResult
	for _, backend := range p.ClientBackends {
		logf("client paths: %s", backend)
		r, err := b.clientPaths(ctx, backend)
		if err != nil {
			return "", fmt.Errorf("client paths, %s: %w", backend, err)
		}
		clients = append(clients, r...)
	}
	if b.ts != nil {
		if _, err := b.ts.since(0); err != nil {
			return "", err
		}
	}
	return report(mach, p, results, clients, b.ts == nil, time.Since(started)), nil
}

// machine describes where the figures come from.
func machine(ctx context.Context) [][2]string {
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "unknown"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				var kb uint64
				fmt.Sscan(v, &kb)
				mem = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	kernel := "unknown"
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		kernel = unix.ByteSliceToString(u.Release[:])
	}
	ipt := "unknown"
	if out, err := exec.CommandContext(ctx, "iptables", "--version").Output(); err == nil {
		ipt = strings.TrimSpace(string(out))
	}
	return [][2]string{
		{"CPU", cpu},
		{"cores", fmt.Sprint(runtime.NumCPU())},
		{"memory", mem},
		{"kernel", kernel},
		{"iptables", ipt},
		{"go", runtime.Version()},
		{"date", time.Now().UTC().Format("2006-01-02 15:04 MST")},
		{"load average at start", loadAvg()},
	}
}

// loadAvg is the first three fields of /proc/loadavg: the figures are only
// as quiet as the machine was.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

// report is the whole of BENCHMARKS.md.
func report(mach [][2]string, p plan, results []scenarioResult, clients []clientResult, approx bool, took time.Duration) string {
	var b strings.Builder
	b.WriteString("# Benchmarks: the sidecar against per-rule checks and save-and-compare\n\n")
	b.WriteString("Generated by `make bench`; do not edit. Rerun as root with `sudo make bench` ")
	b.WriteString("(full: 8 scenarios and the client paths on both backends, at most 10 minutes) or `sudo make bench QUICK=1` (3 scenarios, fewer repetitions and syncs, the client paths on nft, at most 3 minutes).\n\n")
	mode := "full"
	if p.Quick {
		mode = "quick (`-quick`)"
	}
	if p.Only != "" {
		mode += ", " + p.Only + " only (`-backend " + p.Only + "`)"
	}
	fmt.Fprintf(&b, "Run: %s, %d scenarios, %d runs per one-shot figure, %d daemon syncs for the steady state, %d repetitions per repair, client paths on %s; took %s.\n\n",
		mode, len(p.Scenarios), p.Reps, p.Syncs, p.RepairReps, strings.Join(p.ClientBackends, " and "), took.Round(time.Second))
	mach = append(mach, [2]string{"load average at end", loadAvg()})
	b.WriteString("## Machine\n\n")
	for _, kv := range mach {
		fmt.Fprintf(&b, "- %s: %s\n", kv[0], kv[1])
	}
	b.WriteString("\n## Results\n\n")
	if approx {
		b.WriteString("**Approximate:** taskstats was unavailable; CPU and peak memory come from wait4's rusage (children's peak includes the parent's pages), and process counts are unknown (?).\n\n")
	}
	var rows []row
	for _, r := range results {
		rows = append(rows, rowsFor(r)...)
	}
	b.WriteString(markdownTable(rows))
	b.WriteString("\n## Client paths\n\n")
	fmt.Fprintf(&b, "A pod's connections to the `kubernetes` Service's ClusterIP %s:%d, which kube-proxy-shaped rules DNAT to %s:%d, one at a time (connect, then close), for %s or %s connections per path, whichever came first:\n\n",
		clientClusterIP, benchPort, benchIP, benchPort, p.ClientTime, thousands(p.ClientConns))
	b.WriteString(clientTable(clients))
	b.WriteString("\n## Targets\n\n")
	b.WriteString(checkList(append(checks(results), clientChecks(clients)...)))
	b.WriteString("\n## Method\n\n")
	fmt.Fprintf(&b, methodText, p.Reps, p.Syncs, p.LoopBudget, p.RepairReps)
	b.WriteString("\nCross-check, the sidecar's own log at exit (one-shot converged, -v 2): CPU from getrusage, its own and its children's, and its peak memory from the kernel's high-water mark (VmHWM):\n\n")
	for _, r := range results {
		cc := r.CrossCheck
		if cc == "" {
			cc = "(not logged)"
		}
		fmt.Fprintf(&b, "- %s: `%s`\n", r.Scenario, cc)
	}
	return b.String()
}

const methodText = `- **Scenarios.** Each runs in a network namespace of its own (` + "`ip netns add apbench-<pid>-<n>`" + `). Foreign rules are generated and loaded once, into the empty table, with one ` + "`iptables-restore`" + ` of the scenario's backend: in nat kube-proxy style (KUBE-SERVICES jumped from PREROUTING and OUTPUT, per service a KUBE-SVC chain choosing one of two KUBE-SEP chains at random, each marking hairpin traffic and DNATing; KUBE-MARK-MASQ, KUBE-POSTROUTING), in filter CNI-policy style (per pod a chain jumped from FORWARD with eight allowed peers, plus chains jumped from INPUT and OUTPUT). Counts are of rules.
- **Contenders.** Ours is the sidecar binary with ` + "`--ip-address 10.96.0.2 --setup-iptables --iptables-backend=<backend>`" + ` (port 443). The baselines are modes of the benchmark binary (same Go start-up): *per-rule check* puts the five rules straight into the built-in chains (raw PREROUTING and OUTPUT, filter INPUT and OUTPUT), runs ` + "`iptables -w 5 -t T -C CHAIN rule`" + ` for each and ` + "`-I`" + ` where missing; *save and compare* runs ` + "`iptables-save -t raw`" + ` and ` + "`-t filter`" + `, compares the listed lines with the five rules as it streams them, and inserts what is missing. All three list lo's addresses over netlink and add 10.96.0.2 if missing. Every program is started the same way: forked from an OS thread switched into the namespace (setns), with the same environment, including a private ` + "`XTABLES_LOCKFILE`" + ` (the machine's lock is shared with other work).
- **One-shot converged**: everything already in place; median of %[1]d runs. **Fresh apply**: before each of %[1]d runs the contender's state is torn down (ours: ` + "`--daemon=false --cleanup`" + `; baselines: their rules deleted and the address removed).
- **Wall** is the monotonic clock from start to wait. **CPU** is user + system time of the process and of every child it started, as wait4 reports it when the process is reaped: the kernel scales the process's tick samples to the scheduler's exact runtime and adds the children it waited for. Everything else per process comes from the kernel's taskstats exit records (generic netlink, registered for all CPUs). **Peak** is the process's own peak RSS (hiwater_rss of its exit records) plus the largest child's (children run one at a time); the cell shows the sum, then own + largest child. getrusage's children figure is not used: Go starts children with vfork, so each child's maxrss counts the parent's pages. Children that never ran a program are not counted as processes, nor in the peak: the Go runtime's one-time check that clone(CLONE_PIDFD) works starts a copy of the process that shares its memory and exits at once.
- **Steady state.** Ours runs as a daemon with ` + "`--sync-interval 100ms -v 2`" + `; after 5 syncs it has converged, then a window of %[2]d syncs is counted from its "Sync finished" log lines. CPU per sync is the daemon's own CPU in the window (sum of field 1 of /proc/PID/task/*/schedstat at the start and end) plus the CPU of the children that exited in the window (taskstats' ac_utime + ac_stime: tick samples, exact only on average over many children), divided by the syncs; processes per sync are those children divided by the syncs. The baselines' sync is one converged pass: N passes run in one process (` + "`-loop N`" + `), N = 60 or fewer where a pass is slow (N is chosen so that the loop takes about %[3]s, at least 3), and CPU and children are divided by N (so this includes their start-up, amortised).
- **Repair** (ours only): the daemon runs with ` + "`--sync-interval 1m`" + `. The harness deletes the address (netlink, in the namespace), flushes ` + "`APISERVER-PROXY-INPUT`" + ` or deletes the jump to it from INPUT (` + "`iptables`" + ` of the backend), and from the moment that returns polls, 1 ms after each check, until it is whole again (address back; the chain's rule back; exactly one jump). %[4]d repetitions, median and max, each after the daemon has logged no sync for 300 ms. With nft, rule checks run ` + "`iptables -S`" + ` of the chain: the median time of one check is shown, and bounds the resolution (with 50,000 rules in the same table a check costs tens of milliseconds). With legacy, where ` + "`iptables-legacy -S`" + ` of a table of 50,000 rules costs half a second, the check asks the filter table's entry count in-process (` + "`IPT_SO_GET_INFO`" + `, microseconds) until it is back to what it was before the break, and ` + "`iptables-legacy -S`" + ` then confirms the rules (the repair counts until it does, should the first confirmation fail). The legacy backend sends no rule events; the daemon polls its tables' info every 100 ms, so a rule repair there starts from that. The baselines poll every 60 s: that is their repair latency.
- **Idle daemon RSS** is VmRSS of the steady-state daemon after its window.
- **Client paths.** Per backend a node namespace, with kube-proxy's iptables-mode rules for the ` + "`kubernetes`" + ` Service (KUBE-SERVICES jumped from PREROUTING and OUTPUT, KUBE-SVC, KUBE-SEP with KUBE-MARK-MASQ and a DNAT of ` + clientClusterIP + `:443 to ` + benchIP + `:443; KUBE-POSTROUTING), loaded with that backend, and filter policies left at ACCEPT; and per path a fresh pod namespace, joined to it by a veth and routed through it. *Through the DNAT*: the sidecar with ` + "`--ip-address " + benchIP + " --daemon=false`" + ` (no rules), a listener on ` + benchIP + `:443. *Intercepted*: then the sidecar with ` + "`--ip-address " + benchIP + "," + clientClusterIP + " --setup-iptables --daemon=false`" + `, and a listener on ` + clientClusterIP + `:443 as well. The listeners accept, wait for the client to close, then close: the client's end keeps its port in TIME_WAIT, so no port is reused during the run. From a thread of the benchmark switched into the pod (setns), after 20 connections to warm up, connections to the ClusterIP are made one at a time with blocking system calls: socket, a non-blocking connect and poll until it is connected (timed: SYN out, SYN-ACK back), close. The rate is connections over the loop's wall time; p50 and p99 are nearest-rank percentiles of the connect times. Conntrack entries are the node namespace's ` + "`nf_conntrack_count`" + ` after the loop minus before it, per 1,000 connections: the entries of closed connections, in TIME_WAIT for two minutes, count.
`
