package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
)

const (
	benchIP   = "10.96.0.2"
	benchPort = 443
	ourChain  = "APISERVER-PROXY-INPUT"
)

// contender is the sidecar or one of the baselines.
type contender int

const (
	ours contender = iota
	perRule
	saveCompare
)

var contenders = []contender{ours, perRule, saveCompare}

func (c contender) String() string {
	return [...]string{"ours", "per-rule check", "save and compare"}[c]
}

// runStats is what one whole-process run cost.
type runStats struct {
	Wall time.Duration
	usage
	// Rusage is the sidecar's own getrusage line ("Resource use"), if any.
	Rusage string
}

// oneShot is the median of several runs, figure by figure.
type oneShot struct {
	Wall, CPU               time.Duration
	SelfPeakKB, ChildPeakKB uint64
	Children                float64
	Runs                    int
}

// PeakKB is the process's peak plus its largest child's: children run one
// at a time, so that is the most the two hold at once.
func (o oneShot) PeakKB() uint64 { return o.SelfPeakKB + o.ChildPeakKB }

// steady is the cost of one sync of a converged node.
type steady struct {
	CPUPerSync   time.Duration
	ProcsPerSync float64
	Syncs        int  // syncs (or passes) measured
	Loop         bool // a baseline: passes of a loop in one process
}

// repairLatency is how long a repair took: median and max over N, or a
// text where it was not measured.
type repairLatency struct {
	Median, Max time.Duration
	N           int
	Text        string
	// Check is the median time one check of the state took: the
	// resolution of the figure.
	Check time.Duration
}

type contenderResult struct {
	Converged, Fresh oneShot
	Steady           steady
}

type scenarioResult struct {
	Scenario  scenario
	Results   [3]contenderResult
	Repair    [3]repairLatency // address, chain, jump; ours only
	IdleRSSKB uint64
	// CrossCheck is the sidecar's own getrusage line from a converged run.
	CrossCheck string
	LoadTime   time.Duration
}

var repairKinds = []string{"address", "chain", "jump"}

// plan is how much to measure.
type plan struct {
	Quick      bool
	Scenarios  []scenario
	Reps       int // one-shot runs per figure
	Syncs      int // daemon syncs in the steady-state window
	RepairReps int
	// LoopBudget bounds a baseline's steady-state loop: N passes, at most
	// 60, fewer where a pass is slow.
	LoopBudget time.Duration
	// ClientBackends are the backends the client paths are measured on;
	// each path runs for ClientTime or ClientConns connections, whichever
	// comes first.
	ClientBackends []string
	ClientTime     time.Duration
	// ClientConns stays well below the pod's 28,232 ephemeral ports: every
	// closed connection keeps its port in TIME_WAIT for a minute.
	ClientConns int
	Bound       time.Duration
	// Only is the one backend measured, "" for both.
	Only string
}

func newPlan(quick bool) plan {
	if quick {
		return plan{
			Quick: true,
			Scenarios: []scenario{
				{"nft", "", 0}, {"nft", "nat", 50000}, {"legacy", "filter", 50000},
			},
			Reps: 3, Syncs: 20, RepairReps: 3, LoopBudget: time.Second,
			ClientBackends: []string{"nft"}, ClientTime: 2 * time.Second, ClientConns: 10000,
			Bound: 3 * time.Minute,
		}
	}
	var all []scenario
	for _, b := range []string{"nft", "legacy"} {
		all = append(all, scenario{b, "", 0}, scenario{b, "nat", 10000}, scenario{b, "nat", 50000}, scenario{b, "filter", 50000})
	}
	return plan{Scenarios: all, Reps: 7, Syncs: 60, RepairReps: 7, LoopBudget: 4 * time.Second,
		ClientBackends: []string{"nft", "legacy"}, ClientTime: 4 * time.Second, ClientConns: 10000,
		Bound: 9 * time.Minute}
}

// only keeps the scenarios and client paths of backend ("": all).
func (p plan) only(backend string) plan {
	if backend == "" {
		return p
	}
	var scs []scenario
	for _, sc := range p.Scenarios {
		if sc.Backend == backend {
			scs = append(scs, sc)
		}
	}
	var cbs []string
	for _, b := range p.ClientBackends {
		if b == backend {
			cbs = append(cbs, b)
		}
	}
	p.Scenarios, p.ClientBackends, p.Only = scs, cbs, backend
	return p
}

// bench measures the scenarios.
type bench struct {
	h    *harness
	ts   *taskstats // nil: fall back to wait4's rusage (approximate)
	bin  string     // the sidecar
	self string     // this program, for the baselines
	plan plan
	log  func(format string, args ...any)
}

func (b *bench) ourArgs(backend string, extra ...string) []string {
	return append([]string{b.bin, "--ip-address", benchIP, "--setup-iptables", "--iptables-backend=" + backend}, extra...)
}

func (b *bench) baselineArgs(c contender, backend string, extra ...string) []string {
	mode := "baseline-percheck"
	if c == saveCompare {
		mode = "baseline-save"
	}
	return append([]string{b.self, mode, "-backend", backend, "-ip", benchIP, "-port", strconv.Itoa(benchPort)}, extra...)
}

// oneShotArgs is a converged-or-fresh one-shot run of c.
func (b *bench) oneShotArgs(c contender, backend string) []string {
	if c == ours {
		return b.ourArgs(backend, "--daemon=false", "-v", "2")
	}
	return b.baselineArgs(c, backend)
}

// teardown removes what c put in place.
func (b *bench) teardown(ctx context.Context, ns *namespace, c contender, backend string) error {
	args := b.baselineArgs(c, backend, "-cleanup")
	if c == ours {
		args = b.ourArgs(backend, "--daemon=false", "--cleanup")
	}
	_, err := b.h.Run(ctx, ns, "", args[0], args[1:]...)
	return err
}

// measure runs argv in ns and returns what it cost.
func (b *bench) measure(ctx context.Context, ns *namespace, argv []string) (runStats, error) {
	c := b.h.Command(ctx, argv[0], argv[1:]...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	mark := 0
	if b.ts != nil {
		mark = b.ts.mark()
	}
	start := time.Now()
	if err := b.h.Start(ns, c); err != nil {
		return runStats{}, err
	}
	err := b.h.Wait(c)
	st := runStats{Wall: time.Since(start)}
	if err != nil {
		return st, fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, lastLines(stderr.String(), 5))
	}
	if m := resourceUse.FindString(stderr.String()); m != "" {
		st.Rusage = m
	}
	if b.ts == nil {
		ru := c.ProcessState.SysUsage().(*syscall.Rusage)
		st.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		st.SelfPeakKB = uint64(ru.Maxrss)
		st.Children = -1
		return st, nil
	}
	if err := b.ts.barrier(ctx); err != nil {
		return st, err
	}
	recs, err := b.ts.since(mark)
	if err != nil {
		return st, err
	}
	st.usage = usageOf(recs, uint32(c.Process.Pid), inodeOf(argv[0]))
	// CPU from wait4: the kernel reports the process's time scaled to the
	// scheduler's exact runtime, plus that of every child it waited for.
	// Taskstats' per-task times are tick samples (4 ms here).
	ru := c.ProcessState.SysUsage().(*syscall.Rusage)
	st.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	// APBENCH_DEBUG=1 prints the exit records each figure is made of.
	if os.Getenv("APBENCH_DEBUG") != "" {
		for _, r := range recs {
			if r.process() == uint32(c.Process.Pid) || r.PPID == uint32(c.Process.Pid) {
				fmt.Fprintf(os.Stderr, "    %+v\n", r)
			}
		}
	}
	if st.SelfPeakKB == 0 {
		return st, fmt.Errorf("%s: no taskstats record of pid %d", argv[0], c.Process.Pid)
	}
	return st, nil
}

var resourceUse = regexp.MustCompile(`"Resource use".*`)

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// repeat measures argv reps times; before each run, prepare (if not nil).
func (b *bench) repeat(ctx context.Context, ns *namespace, argv []string, reps int, prepare func() error) (oneShot, string, error) {
	var runs []runStats
	for range reps {
		if prepare != nil {
			if err := prepare(); err != nil {
				return oneShot{}, "", err
			}
		}
		st, err := b.measure(ctx, ns, argv)
		if err != nil {
			return oneShot{}, "", err
		}
		runs = append(runs, st)
	}
	med := func(f func(runStats) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = f(r)
		}
		return median(v)
	}
	o := oneShot{
		Wall:        time.Duration(med(func(r runStats) float64 { return float64(r.Wall) })),
		CPU:         time.Duration(med(func(r runStats) float64 { return float64(r.CPU) })),
		SelfPeakKB:  uint64(med(func(r runStats) float64 { return float64(r.SelfPeakKB) })),
		ChildPeakKB: uint64(med(func(r runStats) float64 { return float64(r.ChildPeakKB) })),
		Children:    med(func(r runStats) float64 { return float64(r.Children) }),
		Runs:        len(runs),
	}
	return o, runs[len(runs)/2].Rusage, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// scenario measures everything for one scenario in a namespace of its own.
func (b *bench) scenario(ctx context.Context, sc scenario) (res scenarioResult, err error) {
	res.Scenario = sc
	ns, err := b.h.NewNamespace(ctx)
	if err != nil {
		return res, err
	}
	defer func() {
		if derr := b.h.DeleteNamespace(ns); derr != nil && err == nil {
			err = derr
		}
	}()
	if p := sc.payload(); p != "" {
		start := time.Now()
		// Without --noflush: the table is empty in a new namespace, and
		// iptables-nft-restore --noflush of 20,000 chains takes a minute.
		if _, err := b.h.Run(ctx, ns, p, "iptables-"+sc.Backend+"-restore"); err != nil {
			return res, fmt.Errorf("loading foreign rules: %w", err)
		}
		res.LoadTime = time.Since(start)
		b.log("  loaded %s foreign rules into %s in %s", thousands(sc.Rules), sc.Table, res.LoadTime.Round(time.Millisecond))
	}
	for _, c := range contenders {
		r := &res.Results[c]
		teardown := func() error { return b.teardown(ctx, ns, c, sc.Backend) }
		if err := teardown(); err != nil {
			return res, err
		}
		argv := b.oneShotArgs(c, sc.Backend)
		if r.Fresh, _, err = b.repeat(ctx, ns, argv, b.plan.Reps, teardown); err != nil {
			return res, fmt.Errorf("%s, fresh apply: %w", c, err)
		}
		var rusage string
		if r.Converged, rusage, err = b.repeat(ctx, ns, argv, b.plan.Reps, nil); err != nil {
			return res, fmt.Errorf("%s, converged: %w", c, err)
		}
		if c == ours {
			res.CrossCheck = rusage
			if r.Steady, res.IdleRSSKB, err = b.daemonSteady(ctx, ns, sc.Backend); err != nil {
				return res, fmt.Errorf("ours, steady state: %w", err)
			}
			if res.Repair, err = b.repairs(ctx, ns, sc.Backend); err != nil {
				return res, fmt.Errorf("ours, repair: %w", err)
			}
		} else if r.Steady, err = b.loopSteady(ctx, ns, c, sc.Backend, r.Converged.Wall); err != nil {
			return res, fmt.Errorf("%s, steady state: %w", c, err)
		}
		b.log("  %-16s converged %s, fresh %s", c, r.Converged.Wall.Round(100*time.Microsecond), r.Fresh.Wall.Round(100*time.Microsecond))
		if err := teardown(); err != nil {
			return res, err
		}
	}
	return res, nil
}

// loopSteady measures a baseline's converged pass as N passes in one
// process: N is 60, or fewer where a pass is slow.
func (b *bench) loopSteady(ctx context.Context, ns *namespace, c contender, backend string, pass time.Duration) (steady, error) {
	n := 60
	if pass > 0 {
		n = max(3, min(60, int(b.plan.LoopBudget/pass)))
	}
	st, err := b.measure(ctx, ns, b.baselineArgs(c, backend, "-loop", strconv.Itoa(n)))
	if err != nil {
		return steady{}, err
	}
	return steady{CPUPerSync: st.CPU / time.Duration(n), ProcsPerSync: float64(st.Children) / float64(n), Syncs: n, Loop: true}, nil
}

// daemon is the sidecar running in daemon mode, its log followed.
type daemon struct {
	h   *harness
	cmd *exec.Cmd
	pid int

	mu       sync.Mutex
	syncs    int
	lastSync time.Time
	repaired int // "Repaired ..." lines
	changed  chan struct{}
	done     chan struct{}
	tail     []string

	stopOnce sync.Once
	stopErr  error
}

func (b *bench) startDaemon(ctx context.Context, ns *namespace, args []string) (*daemon, error) {
	c := b.h.Command(ctx, args[0], args[1:]...)
	pipe, err := c.StderrPipe()
	if err != nil {
		return nil, err
	}
	d := &daemon{h: b.h, cmd: c, changed: make(chan struct{}), done: make(chan struct{})}
	if err := b.h.Start(ns, c); err != nil {
		return nil, err
	}
	d.pid = c.Process.Pid
	go func() {
		defer close(d.done)
		sc := bufio.NewScanner(pipe)
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			if strings.Contains(line, `"Sync finished"`) {
				d.syncs++
				d.lastSync = time.Now()
			}
			if strings.Contains(line, `"Repaired `) {
				d.repaired++
			}
			d.tail = append(d.tail[max(0, len(d.tail)-20):], line)
			close(d.changed)
			d.changed = make(chan struct{})
			d.mu.Unlock()
		}
	}()
	return d, nil
}

// waitSyncs waits until the daemon has logged n syncs.
func (d *daemon) waitSyncs(ctx context.Context, n int, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		d.mu.Lock()
		got, ch := d.syncs, d.changed
		d.mu.Unlock()
		if got >= n {
			return got, nil
		}
		select {
		case <-ch:
		case <-d.done:
			return got, fmt.Errorf("daemon exited after %d syncs: %s", got, d.lastLog())
		case <-ctx.Done():
			return got, fmt.Errorf("%d of %d syncs logged: %w; log ends: %s", got, n, ctx.Err(), d.lastLog())
		}
	}
}

// quiet waits until the daemon has logged no sync for q: a repair's own
// write may trigger one more verification, which must not overlap the next
// measurement.
func (d *daemon) quiet(ctx context.Context, q time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		d.mu.Lock()
		last := d.lastSync
		d.mu.Unlock()
		if time.Since(last) >= q {
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return fmt.Errorf("daemon never went quiet: %w", ctx.Err())
		}
	}
}

// repairs is how many "Repaired ..." lines the daemon has logged.
func (d *daemon) repairs() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.repaired
}

func (d *daemon) lastLog() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.tail[max(0, len(d.tail)-3):], " | ")
}

// stop ends the daemon with SIGTERM (killing it after 10 s). It may be
// called more than once.
func (d *daemon) stop() error {
	d.stopOnce.Do(func() { d.stopErr = d.terminate() })
	return d.stopErr
}

func (d *daemon) terminate() error {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
	}
	err := d.h.Wait(d.cmd)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return fmt.Errorf("daemon exited with %v: %s", err, d.lastLog())
	}
	return err
}

// daemonSteady runs ours as a daemon syncing every 100 ms and measures
// Syncs syncs once it has converged; then reads its idle RSS.
func (b *bench) daemonSteady(ctx context.Context, ns *namespace, backend string) (steady, uint64, error) {
	d, err := b.startDaemon(ctx, ns, b.ourArgs(backend, "--sync-interval", "100ms", "--unsafe-short-sync-interval", "-v", "2"))
	if err != nil {
		return steady{}, 0, err
	}
	defer d.stop()
	// Converged: a sync that wrote, one that verified, and a few more.
	if _, err := d.waitSyncs(ctx, 5, 30*time.Second); err != nil {
		return steady{}, 0, err
	}
	// The window opens just after a sync was logged (the next one is up to
	// 100 ms away) and closes just after the last one was: both edges are
	// taken the same way, so a sync running at an edge (where syncs take
	// longer than the interval) is as likely counted at one as missed at
	// the other.
	s0, err := d.waitSyncs(ctx, 6, 30*time.Second)
	if err != nil {
		return steady{}, 0, err
	}
	mark := 0
	if b.ts != nil {
		if err := b.ts.barrier(ctx); err != nil {
			return steady{}, 0, err
		}
		mark = b.ts.mark()
	}
	cpu0, err := schedCPU(d.pid)
	if err != nil {
		return steady{}, 0, err
	}
	s1, err := d.waitSyncs(ctx, s0+b.plan.Syncs, time.Duration(b.plan.Syncs)*500*time.Millisecond+30*time.Second)
	if err != nil {
		return steady{}, 0, err
	}
	cpu1, err := schedCPU(d.pid)
	if err != nil {
		return steady{}, 0, err
	}
	n := s1 - s0
	st := steady{Syncs: n, CPUPerSync: (cpu1 - cpu0) / time.Duration(n)}
	if b.ts != nil {
		if err := b.ts.barrier(ctx); err != nil {
			return st, 0, err
		}
		recs, err := b.ts.since(mark)
		if err != nil {
			return st, 0, err
		}
		kids := childrenOf(recs, uint32(d.pid), inodeOf(b.bin))
		st.CPUPerSync = (cpu1 - cpu0 + kids.CPU) / time.Duration(n)
		st.ProcsPerSync = float64(kids.Children) / float64(n)
	} else {
		st.ProcsPerSync = -1
	}
	rss, err := vmRSS(d.pid)
	if err != nil {
		return st, 0, err
	}
	return st, rss, d.stop()
}

// schedCPU is the CPU time of every thread of pid so far, from
// /proc/PID/task/*/schedstat (nanoseconds on CPU).
func schedCPU(pid int) (time.Duration, error) {
	files, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil || len(files) == 0 {
		return 0, fmt.Errorf("schedstat of pid %d: %v", pid, err)
	}
	var sum time.Duration
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		fields := strings.Fields(string(b))
		if len(fields) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		sum += time.Duration(ns)
	}
	return sum, nil
}

// vmRSS is the resident set of pid now, in KiB.
func vmRSS(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				return strconv.ParseUint(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// repairs runs ours as a daemon with a one-minute interval, breaks one
// thing at a time and polls until it is whole again.
func (b *bench) repairs(ctx context.Context, ns *namespace, backend string) ([3]repairLatency, error) {
	var out [3]repairLatency
	d, err := b.startDaemon(ctx, ns, b.ourArgs(backend, "--sync-interval", "1m", "-v", "2"))
	if err != nil {
		return out, err
	}
	defer d.stop()
	if _, err := d.waitSyncs(ctx, 1, 30*time.Second); err != nil {
		return out, err
	}
	iptables := "iptables-" + backend
	lastCheck := "" // what the last check of the chain saw, for an error
	check := map[string]func() (bool, error){
		"address": func() (bool, error) { return b.hasAddress(ns) },
		"chain": func() (bool, error) {
			out, err := b.h.Run(ctx, ns, "", iptables, "-t", "filter", "-S", ourChain)
			if err != nil {
				lastCheck = err.Error()
				return false, nil // being rewritten
			}
			lastCheck = out
			want := fmt.Sprintf("-N %s\n-A %s -d %s/32 -p tcp -m tcp --dport %d -j ACCEPT\n", ourChain, ourChain, benchIP, benchPort)
			return out == want, nil
		},
		"jump": func() (bool, error) {
			out, err := b.h.Run(ctx, ns, "", iptables, "-t", "filter", "-S", "INPUT")
			if err != nil {
				return false, err
			}
			return strings.Count(out, "-A INPUT -j "+ourChain+"\n") == 1, nil
		},
	}
	breakIt := map[string]func() error{
		"address": func() error {
			lo, err := ns.NL.LinkByName("lo")
			if err != nil {
				return err
			}
			return ns.NL.AddrDel(lo, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(benchIP).To4(), Mask: net.CIDRMask(32, 32)}})
		},
		"chain": func() error {
			_, err := b.h.Run(ctx, ns, "", iptables, "-t", "filter", "-F", ourChain)
			return err
		},
		"jump": func() error {
			_, err := b.h.Run(ctx, ns, "", iptables, "-t", "filter", "-D", "INPUT", "-j", ourChain)
			return err
		},
	}
	for _, kind := range repairKinds {
		if err := b.pollWhole(ctx, check[kind], 10*time.Second); err != nil {
			return out, fmt.Errorf("%s not in place before breaking it: %w", kind, err)
		}
	}
	// With legacy, iptables-legacy -S of a table of 50,000 rules takes
	// half a second, which would be most of what is measured: the moment
	// the repair is in the kernel is when the filter table's entry count,
	// asked in-process in microseconds, is back to what it was; a check
	// with iptables -S then confirms it.
	var entries func() (uint32, error)
	if backend == "legacy" {
		sock, err := xtables.Open(ns.Handle, xtables.IPv4)
		if err != nil {
			return out, err
		}
		defer sock.Close()
		entries = func() (uint32, error) {
			in, err := sock.Info("filter")
			return in.NumEntries, err
		}
	}
	for i, kind := range repairKinds {
		var lat, checks []float64
		var wholeEntries uint32
		timed := func() (bool, error) {
			start := time.Now()
			var ok bool
			var err error
			if entries != nil && kind != "address" {
				var n uint32
				n, err = entries()
				ok = n == wholeEntries
			} else {
				ok, err = check[kind]()
			}
			checks = append(checks, float64(time.Since(start)))
			return ok, err
		}
		for range b.plan.RepairReps {
			if err := d.quiet(ctx, 300*time.Millisecond); err != nil {
				return out, err
			}
			repairedBefore := d.repairs()
			if entries != nil {
				if wholeEntries, err = entries(); err != nil {
					return out, err
				}
			}
			if err := breakIt[kind](); err != nil {
				return out, fmt.Errorf("breaking the %s: %w", kind, err)
			}
			start := time.Now()
			err := b.pollWhole(ctx, timed, 20*time.Second)
			took := time.Since(start)
			if err == nil && entries != nil && kind != "address" {
				// The count is back; the rules must be too. Where they are
				// not yet, the repair is when they are.
				if whole, cerr := check[kind](); cerr != nil || !whole {
					err = b.pollWhole(ctx, check[kind], 20*time.Second)
					took = time.Since(start)
				}
			}
			if err == nil {
				// The check may see the repair before its log line is
				// read from the pipe; quiet must wait from that line on.
				err = b.pollWhole(ctx, func() (bool, error) { return d.repairs() > repairedBefore, nil }, 20*time.Second)
			}
			if err != nil {
				saved, _ := b.h.Run(ctx, ns, "", iptables+"-save", "-t", "filter")
				return out, fmt.Errorf("%s not repaired: %w; the last check of the chain saw %q; the table: %q; log ends: %s", kind, err, lastCheck, saved, d.lastLog())
			}
			lat = append(lat, float64(took))
		}
		out[i] = repairLatency{Median: time.Duration(median(lat)), Max: time.Duration(slices.Max(lat)), N: len(lat), Check: time.Duration(median(checks))}
	}
	return out, d.stop()
}

func (b *bench) hasAddress(ns *namespace) (bool, error) {
	lo, err := ns.NL.LinkByName("lo")
	if err != nil {
		return false, err
	}
	return hasAddressVia(ns.NL, lo)
}

func hasAddressVia(h *netlink.Handle, lo netlink.Link) (bool, error) {
	addrs, err := h.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return false, err
	}
	ip := net.ParseIP(benchIP)
	for _, a := range addrs {
		if a.IPNet.IP.Equal(ip) {
			return true, nil
		}
	}
	return false, nil
}

// pollWhole polls ok every 1 ms (after each check) until it reports true.
func (b *bench) pollWhole(ctx context.Context, ok func() (bool, error), timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		whole, err := ok()
		if err != nil {
			return err
		}
		if whole {
			return nil
		}
		select {
		case <-time.After(time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
