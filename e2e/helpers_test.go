package e2e

// The one place for what the end-to-end tests share: the binary, the
// daemon, shims on PATH, the state reader, the poll, metrics, the
// kube-proxy-shaped node of the client tests and the TCP helpers.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/kubeproxy"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

const (
	// sidecarPackage is the sidecar's main package, built by sidecarBinary.
	sidecarPackage = "github.com/apiserver-proxy/apiserver-proxy-sidecar"
	// binaryName is the built binary's name, as the image ships it.
	binaryName = "apiserver-proxy-sidecar"
	// exitFailure is the sidecar's exit code for a one-shot run that
	// failed (exitUsage, 2, is for a bad command line).
	exitFailure = 1

	// deadline bounds every wait for the sidecar, unless a call says
	// otherwise (within): far above what the tests measure, so that a busy
	// machine does not make them flake. Where a bound is what a test
	// asserts, the test passes its own.
	deadline = 60 * time.Second

	// dualStack is the --ip-address that ourState and wantState describe.
	dualStack = "10.96.0.2,fd00::2"
	// metricsAddr is where a daemon serves metrics inside its namespace
	// (every namespace has a loopback of its own, so fixed ports are free).
	metricsAddr = "127.0.0.1:16910"
)

// backends are the iptables backends the tests cover.
var backends = []string{"nft", "legacy"}

// The binary, built once for the whole run into a directory TestMain
// removes.
var build struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

// parallel is how many tests run at once unless -parallel says otherwise.
// The tests mostly wait, on the sidecar, on the kernel, on timeouts; go
// test's default, GOMAXPROCS, would run two at a time on a 2-core machine.
const parallel = 8

func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		if err := flag.Set("test.parallel", strconv.Itoa(max(parallel, runtime.GOMAXPROCS(0)))); err != nil {
			fmt.Fprintf(os.Stderr, "setting -parallel: %v\n", err)
			os.Exit(2)
		}
	}
	code := m.Run()
	if build.dir != "" {
		if err := os.RemoveAll(build.dir); err != nil {
			fmt.Fprintf(os.Stderr, "removing the built sidecar: %v\n", err)
		}
	}
	os.Exit(code)
}

// sidecarBinary returns the path of the sidecar's binary, building it on
// the first call of the run. When the tests run with the race detector, so
// does the sidecar (which needs cgo): a data race in the daemon is
// reported on its stderr, and startDaemon fails the test that ran it.
func sidecarBinary(t testing.TB) string {
	t.Helper()
	build.once.Do(func() {
		build.dir, build.err = os.MkdirTemp("", "apsc-e2e-")
		if build.err != nil {
			return
		}
		build.bin = filepath.Join(build.dir, binaryName)
		args := []string{"build", "-o", build.bin}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, sidecarPackage)...)
		if raceEnabled {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("%s: %w\n%s", cmd, err, out)
		}
	})
	if build.err != nil {
		t.Fatalf("building the sidecar: %v", build.err)
	}
	return build.bin
}

// e2eTest starts a test of the binary: it needs root and progs in PATH
// (else it skips, or fails in CI; under -short it skips), runs in parallel
// with the other tests, and gets the sidecar's binary.
func e2eTest(t *testing.T, progs ...string) string {
	t.Helper()
	netnstest.Require(t)
	netnstest.RequireBinaries(t, progs...)
	t.Parallel()
	return sidecarBinary(t)
}

// ---- Waiting ----

// pollOption changes a poll: within, since.
type pollOption func(*pollConfig)

type pollConfig struct {
	within time.Duration
	start  time.Time
}

// within bounds the poll by d instead of the default deadline.
func within(d time.Duration) pollOption { return func(c *pollConfig) { c.within = d } }

// since counts the poll's time, bound and result, from start instead of
// from the call.
func since(start time.Time) pollOption { return func(c *pollConfig) { c.start = start } }

// eventually polls cond until it holds, failing the test once the deadline
// (or within) has passed, and returns how long that took. It polls every
// millisecond at first, so that what it measures is close to the event,
// then every 10ms, and every 50ms after a second; a condition that takes
// longer than that to evaluate waits as long again between polls.
func eventually(t testing.TB, what string, cond func() bool, opts ...pollOption) time.Duration {
	t.Helper()
	c := pollConfig{within: deadline, start: time.Now()}
	for _, o := range opts {
		o(&c)
	}
	for {
		began := time.Now()
		if cond() {
			break
		}
		cost := time.Since(began)
		took := time.Since(c.start)
		if took > c.within {
			t.Fatalf("%s: not within %s", what, c.within)
		}
		// The polling interval: fine while what is measured is short,
		// coarser once it is not, and never shorter than the condition
		// took, which may run programs (iptables-save): many tests poll
		// at once on a machine of two cores.
		pause := time.Millisecond
		switch {
		case took > time.Second:
			pause = 50 * time.Millisecond
		case took > 100*time.Millisecond:
			pause = 10 * time.Millisecond
		}
		time.Sleep(max(pause, cost))
	}
	return time.Since(c.start)
}

// ---- The daemon ----

// daemon is a program, the sidecar or setpriv running it, running in the
// background in a namespace.
type daemon struct {
	cmd *exec.Cmd
	// logFile receives the program's stderr directly, with no pipe in
	// between: a line the sidecar has written is in it, so a test never
	// sees the log lag behind the process.
	logFile string
	done    chan error
}

// startDaemon starts bin with args in ns until the test ends.
func startDaemon(t *testing.T, ns *netnstest.NS, bin string, args ...string) *daemon {
	t.Helper()
	return startDaemonEnv(t, ns, nil, bin, args...)
}

// startDaemonEnv is startDaemon with extra environment variables.
func startDaemonEnv(t *testing.T, ns *netnstest.NS, env []string, bin string, args ...string) *daemon {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "sidecar-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // the child has its own descriptor
	d := &daemon{logFile: f.Name(), done: make(chan error, 1)}
	d.cmd = ns.Command(bin, args...)
	if env != nil {
		d.cmd.Env = append(os.Environ(), env...)
	}
	d.cmd.Stderr = f
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Kill()
			<-d.done
		}
		if strings.Contains(d.log(), "WARNING: DATA RACE") {
			t.Error("the sidecar reported a data race")
		}
		if t.Failed() {
			t.Logf("sidecar log:\n%s", d.log())
		}
	})
	return d
}

// log returns everything the sidecar has logged so far.
func (d *daemon) log() string {
	b, err := os.ReadFile(d.logFile)
	if err != nil {
		panic(fmt.Sprintf("reading the sidecar's log: %v", err))
	}
	return string(b)
}

// logSince returns what d logged after the first n bytes.
func (d *daemon) logSince(n int) string { return d.log()[n:] }

// logLines returns the daemon's log lines from byte offset from on.
func (d *daemon) logLines(from int) []string {
	s := d.log()
	if from > len(s) {
		from = len(s)
	}
	return strings.Split(strings.TrimSpace(s[from:]), "\n")
}

// countLines counts the log lines from byte offset from on that contain s.
func (d *daemon) countLines(from int, s string) int {
	n := 0
	for _, l := range d.logLines(from) {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

// syncsDone counts the syncs a daemon running with -v 2 has finished.
func (d *daemon) syncsDone() int { return strings.Count(d.log(), "Sync finished") }

// startupSynced waits until a daemon running with -v 2 has finished its
// start-up sync and logged it, with whatever it repaired: an offset into
// the log taken after it counts none of the start-up's repairs.
func (d *daemon) startupSynced(t *testing.T) {
	t.Helper()
	eventually(t, "the start-up sync logged", func() bool {
		return strings.Contains(d.log(), `"Sync finished" trigger="startup"`)
	})
}

// repairs applies each drift in ns (a program and its arguments) in turn,
// and waits until the daemon has logged a repair after it and whole holds
// again. The daemon may repair before the test looks: its log says it did.
func (d *daemon) repairs(t *testing.T, ns *netnstest.NS, whole func() bool, drifts ...[]string) {
	t.Helper()
	for _, drift := range drifts {
		repairs := strings.Count(d.log(), "Repaired")
		ns.Run(t, drift[0], drift[1:]...)
		eventually(t, strings.Join(drift, " ")+" repaired", func() bool {
			return strings.Count(d.log(), "Repaired") > repairs && whole()
		})
	}
}

// stop sends SIGTERM and returns the exit code.
func (d *daemon) stop(t *testing.T) int {
	t.Helper()
	return d.signal(t, syscall.SIGTERM)
}

// signal sends sig, unless the process has exited already, and returns the
// exit code, or -1 if a signal ended the process.
func (d *daemon) signal(t *testing.T, sig syscall.Signal) int {
	t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatal(err)
	}
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the sidecar did not exit within 30s of %s", unix.SignalName(sig))
	}
	return d.cmd.ProcessState.ExitCode()
}

// sigkill sends SIGKILL and waits for the process to be gone.
func (d *daemon) sigkill(t *testing.T) {
	t.Helper()
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.done:
	case <-time.After(deadline):
		t.Fatal("the sidecar did not die within the deadline of SIGKILL")
	}
}

// running fails the test if the daemon has exited.
func (d *daemon) running(t *testing.T) {
	t.Helper()
	select {
	case err := <-d.done:
		d.done <- err
		t.Fatalf("the sidecar exited: %v", err)
	default:
	}
}

// isErrorLine reports whether a klog line has error severity.
func isErrorLine(l string) bool { return len(l) > 1 && l[0] == 'E' && l[1] >= '0' && l[1] <= '9' }

// oneShot runs bin with args once in ns, with extra environment variables
// (nil: none), and returns its exit code and output.
func oneShot(t *testing.T, ns *netnstest.NS, env []string, bin string, args ...string) (int, string) {
	t.Helper()
	cmd := ns.Command(bin, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s: %v", cmd, err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// mustOneShot is oneShot that fails the test unless the run exits 0, and
// returns the output.
func mustOneShot(t *testing.T, ns *netnstest.NS, env []string, bin string, args ...string) string {
	t.Helper()
	code, out := oneShot(t, ns, env, bin, args...)
	if code != 0 {
		t.Fatalf("%s %s: exit code %d\n%s", bin, strings.Join(args, " "), code, out)
	}
	return out
}

// ---- Shims on PATH ----

// shims is a directory of scripts that stand in for programs on a
// daemon's PATH: before the real programs (pathFirst), or as the whole
// PATH (pathOnly), where a removed script is a missing program.
type shims struct{ dir string }

func newShims(t *testing.T) *shims { return &shims{dir: t.TempDir()} }

// pathFirst is the environment entry that puts the shims first in PATH.
func (s *shims) pathFirst() string {
	return "PATH=" + s.dir + string(os.PathListSeparator) + os.Getenv("PATH")
}

// pathOnly is the environment entry whose PATH holds the shims alone.
func (s *shims) pathOnly() string { return "PATH=" + s.dir }

// write writes the bash script body as prog. In body, REAL stands for the
// real program's path, which must then be in the test's PATH.
func (s *shims) write(t *testing.T, prog, body string) {
	t.Helper()
	if strings.Contains(body, "REAL") {
		real, err := exec.LookPath(prog)
		if err != nil {
			t.Fatal(err)
		}
		body = strings.ReplaceAll(body, "REAL", real)
	}
	if err := os.WriteFile(filepath.Join(s.dir, prog), []byte("#!/bin/bash\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// countRuns writes shims for progs that log each run and run the real
// program; the returned function counts the runs so far. The log is
// returned too, to show what ran.
func (s *shims) countRuns(t *testing.T, progs ...string) (count func() int, logFile string) {
	t.Helper()
	logFile, count = runLog(t)
	for _, prog := range progs {
		s.write(t, prog, fmt.Sprintf("echo %s >> %s\nexec REAL \"$@\"\n", prog, logFile))
	}
	return count, logFile
}

// runLog returns a file for shims to log runs to, one line each, and a
// function that counts the runs so far.
func runLog(t *testing.T) (string, func() int) {
	t.Helper()
	logFile := filepath.Join(t.TempDir(), "ran")
	return logFile, func() int {
		b, err := os.ReadFile(logFile)
		if os.IsNotExist(err) {
			return 0
		}
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(string(b), "\n")
	}
}

// restoreProgs are the restore programs of backend, both families.
func restoreProgs(backend string) []string {
	return []string{"iptables-" + backend + "-restore", "ip6tables-" + backend + "-restore"}
}

// ---- The node's state ----

// saveProgs are the listing programs of backend for families ("iptables",
// "ip6tables"; none: both).
func saveProgs(backend string, families ...string) []string {
	if len(families) == 0 {
		families = []string{"iptables", "ip6tables"}
	}
	var out []string
	for _, f := range families {
		out = append(out, f+"-"+backend+"-save")
	}
	return out
}

// readState lists what is ours on the node, in a form that does not
// depend on listing order: for each listing program in saves, every line
// that names one of our chains, as "PROGRAM *TABLE LINE" without counters;
// with addrs, our addresses on lo (those of dualStack) as "lo CIDR".
// Sorted, so that a duplicate shows as a repeated line. It runs the real
// programs, whatever a daemon's PATH holds, and returns errors instead of
// failing the test, so that it may run off the test's goroutine.
func readState(ns *netnstest.NS, saves []string, addrs bool) ([]string, error) {
	var out []string
	for _, save := range saves {
		listing, err := ns.RunErr(save)
		if err != nil {
			return nil, err
		}
		table := ""
		for _, line := range strings.Split(listing, "\n") {
			if strings.HasPrefix(line, "*") {
				table = line
			}
			if strings.Contains(line, render.ChainPrefix) {
				out = append(out, save+" "+table+" "+strings.TrimSuffix(line, " [0:0]"))
			}
		}
	}
	if addrs {
		onLo, err := ns.RunErr("ip", "-o", "addr", "show", "dev", "lo")
		if err != nil {
			return nil, err
		}
		for _, f := range strings.Fields(onLo) {
			if f == "10.96.0.2/32" || f == "fd00::2/128" {
				out = append(out, "lo "+f)
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

func mustState(t *testing.T, ns *netnstest.NS, saves []string, addrs bool) []string {
	t.Helper()
	st, err := readState(ns, saves, addrs)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// ourState is readState of backend's both families and our addresses.
func ourState(t *testing.T, ns *netnstest.NS, backend string) []string {
	t.Helper()
	return mustState(t, ns, saveProgs(backend), true)
}

// ipv4State is readState of backend's IPv4 rules alone.
func ipv4State(t *testing.T, ns *netnstest.NS, backend string) []string {
	t.Helper()
	return mustState(t, ns, saveProgs(backend, "iptables"), false)
}

// ourChains is readState of both backends and both families, addresses
// left out.
func ourChains(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	return mustState(t, ns, append(saveProgs("nft"), saveProgs("legacy")...), false)
}

// renderedState is readState of a node where the ruleset rendered for
// addrs is in place, written with backend; with onLo, the addresses too.
func renderedState(t *testing.T, backend string, addrs []netip.Addr, onLo bool) []string {
	t.Helper()
	rulesets, err := render.Render(addrs, 443)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	if onLo {
		for _, a := range addrs {
			out = append(out, "lo "+netip.PrefixFrom(a, a.BitLen()).String())
		}
	}
	for _, rs := range rulesets {
		save := "iptables-" + backend + "-save"
		if rs.Family == render.IPv6 {
			save = "ip6tables-" + backend + "-save"
		}
		for _, tb := range rs.Tables {
			for _, c := range tb.Chains {
				prefix := save + " *" + tb.Name + " "
				out = append(out, prefix+":"+c.Name+" -", prefix+c.JumpRule())
				for _, r := range c.Rules {
					out = append(out, prefix+r)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

// wantState is ourState on a node where the dual-stack ruleset is in place.
func wantState(t *testing.T, backend string) []string {
	t.Helper()
	return renderedState(t, backend, []netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("fd00::2")}, true)
}

// wantIPv4State is ipv4State where the IPv4 ruleset of 10.96.0.2 is in
// place.
func wantIPv4State(t *testing.T, backend string) []string {
	t.Helper()
	return renderedState(t, backend, []netip.Addr{netip.MustParseAddr("10.96.0.2")}, false)
}

// wholeCheck reports whether the node holds exactly the dual-stack ruleset
// and addresses: every chain, rule and jump of ours once, nothing else.
func wholeCheck(t *testing.T, ns *netnstest.NS, backend string) func() bool {
	want := wantState(t, backend)
	return func() bool { return slices.Equal(ourState(t, ns, backend), want) }
}

// sampleState reads the node's state (readState of backend, both
// families and our addresses) over and over, on a goroutine of its own,
// and hands each reading to f with the time it was taken, until the
// returned function is called; that returns once f has run for the last
// time.
func sampleState(ns *netnstest.NS, backend string, f func(st []string, err error, at time.Time)) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			st, err := readState(ns, saveProgs(backend), true)
			f(st, err, time.Now())
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// stateGroups splits a state as readState lists it by listing program and
// table ("iptables-nft-save *raw"); each address on lo is a group of its
// own.
func stateGroups(state []string) map[string][]string {
	g := map[string][]string{}
	for _, line := range state {
		f := strings.Fields(line)
		key := f[0] + " " + f[1]
		if f[0] == "lo" {
			key = line
		}
		g[key] = append(g[key], line)
	}
	return g
}

// loAddrs lists the IPv4 and IPv6 addresses on lo, loopback's own left out.
func loAddrs(t *testing.T, ns *netnstest.NS) []string {
	t.Helper()
	var out []string
	fields := strings.Fields(ns.Run(t, "ip", "-o", "addr", "show", "dev", "lo"))
	for i, f := range fields {
		if (f == "inet" || f == "inet6") && i+1 < len(fields) && fields[i+1] != "127.0.0.1/8" && fields[i+1] != "::1/128" {
			out = append(out, fields[i+1])
		}
	}
	slices.Sort(out)
	return out
}

// hasAddr reports whether dev in ns holds cidr.
func hasAddr(t *testing.T, ns *netnstest.NS, dev, cidr string) bool {
	t.Helper()
	return slices.Contains(strings.Fields(ns.Run(t, "ip", "-o", "addr", "show", "dev", dev)), cidr)
}

// linkUp reports whether dev in ns is administratively up.
func linkUp(t *testing.T, ns *netnstest.NS, dev string) bool {
	t.Helper()
	out := ns.Run(t, "ip", "-o", "link", "show", "dev", dev)
	flags, _, _ := strings.Cut(out, ">")
	_, flags, _ = strings.Cut(flags, "<")
	return slices.Contains(strings.Split(flags, ","), "UP")
}

// ---- HTTP and metrics ----

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

// metricsServed waits until the daemon in ns answers /metrics on addr.
func metricsServed(t *testing.T, ns *netnstest.NS, addr string) {
	t.Helper()
	c := httpIn(t, ns)
	eventually(t, "metrics served", func() bool {
		code, _ := fetchIn(t, c, "http://"+addr+"/metrics")
		return code == 200
	})
}

// series names samples of a metric: those whose labels include labels
// (name, value, name, value...); no labels, every sample of the metric.
type series struct {
	name   string
	labels []string
}

func (s series) String() string {
	if len(s.labels) == 0 {
		return s.name
	}
	var l []string
	for i := 0; i+1 < len(s.labels); i += 2 {
		l = append(l, fmt.Sprintf("%s=%q", s.labels[i], s.labels[i+1]))
	}
	return s.name + "{" + strings.Join(l, ",") + "}"
}

// Series the tests read.
var (
	syncSuccesses   = series{"apiserver_proxy_sidecar_syncs_total", []string{"result", "success"}}
	syncFailures    = series{"apiserver_proxy_sidecar_syncs_total", []string{"result", "failure"}}
	restoreFailures = series{"apiserver_proxy_sidecar_iptables_restore_failures_total", []string{"family", "IPv4"}}
	lockWaits       = series{"apiserver_proxy_sidecar_xtables_lock_waits_total", []string{"family", "IPv4"}}
)

// metrics is one scrape of /metrics, parsed by expfmt.
type metrics struct {
	families map[string]*dto.MetricFamily
	text     string // as served, for messages
}

// scrape GETs and parses /metrics from addr inside ns.
func scrape(t *testing.T, ns *netnstest.NS, addr string) metrics {
	t.Helper()
	code, body := fetchIn(t, httpIn(t, ns), "http://"+addr+"/metrics")
	if code != 200 {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	return metrics{families: families, text: body}
}

// lookup adds up the samples of s; found is false when there are none.
func (m metrics) lookup(s series) (sum float64, found bool) {
	f := m.families[s.name]
	if f == nil {
		return 0, false
	}
	for _, mt := range f.GetMetric() {
		if !hasLabels(mt, s.labels) {
			continue
		}
		found = true
		switch {
		case mt.Counter != nil:
			sum += mt.GetCounter().GetValue()
		case mt.Gauge != nil:
			sum += mt.GetGauge().GetValue()
		case mt.Untyped != nil:
			sum += mt.GetUntyped().GetValue()
		}
	}
	return sum, found
}

func hasLabels(mt *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		if !slices.ContainsFunc(mt.GetLabel(), func(l *dto.LabelPair) bool {
			return l.GetName() == labels[i] && l.GetValue() == labels[i+1]
		}) {
			return false
		}
	}
	return true
}

// value is lookup's sum: 0 when s is absent (a counter not yet counted).
func (m metrics) value(s series) float64 {
	v, _ := m.lookup(s)
	return v
}

// must is lookup's sum, failing the test when s is absent.
func (m metrics) must(t *testing.T, s series) float64 {
	t.Helper()
	v, ok := m.lookup(s)
	if !ok {
		t.Fatalf("/metrics has no %s:\n%s", s, m.text)
	}
	return v
}

// metric is the value of s in the /metrics the daemon in ns serves on
// metricsAddr, or 0 when it is absent.
func metric(t *testing.T, ns *netnstest.NS, s series) float64 {
	t.Helper()
	return scrape(t, ns, metricsAddr).value(s)
}

// ---- The kube-proxy-shaped node and TCP ----

// family is one address family of the traffic and client tests.
type family struct {
	name string
	// proxy is the sidecar's --ip-address, kept on the node's lo.
	proxy netip.Addr
	// node and client are the two ends of the veth between the namespaces.
	node, client netip.Prefix
	// iptables is the program's name without the backend: "iptables" or
	// "ip6tables".
	iptables string
	// conntrack is the family as `conntrack -f` names it.
	conntrack string
	// clusterIP is the `kubernetes` Service's ClusterIP, which kube-proxy
	// DNATs to the proxy's address.
	clusterIP netip.Addr
	// serviceRange is routed off the node, as a node's default route does:
	// a connection to a ClusterIP needs a route before nat OUTPUT can
	// rewrite it.
	serviceRange netip.Prefix
}

var families = []family{
	{
		name:         "IPv4",
		proxy:        netip.MustParseAddr("10.96.0.2"),
		node:         netip.MustParsePrefix("192.0.2.1/24"),
		client:       netip.MustParsePrefix("192.0.2.2/24"),
		iptables:     "iptables",
		conntrack:    "ipv4",
		clusterIP:    netip.MustParseAddr("100.64.0.1"),
		serviceRange: netip.MustParsePrefix("100.64.0.0/16"),
	},
	{
		name:         "IPv6",
		proxy:        netip.MustParseAddr("fd00::2"),
		node:         netip.MustParsePrefix("2001:db8::1/64"),
		client:       netip.MustParsePrefix("2001:db8::2/64"),
		iptables:     "ip6tables",
		conntrack:    "ipv6",
		clusterIP:    netip.MustParseAddr("fd00:10:96::1"),
		serviceRange: netip.MustParsePrefix("fd00:10:96::/112"),
	},
}

const (
	// proxyPort is the sidecar's default --port.
	proxyPort = 443
	// controlPort is a port on the node's veth address that the node's
	// firewall accepts on its own, tracked, as a control.
	controlPort = 8080
	// droppedDialTimeout bounds a dial that is expected to fail: the SYN is
	// dropped, so only the timeout ends it.
	droppedDialTimeout = time.Second
	// echoTimeout bounds a dial, write or read that is expected to succeed.
	echoTimeout = 5 * time.Second
)

// kubeProxyMode is the shape of kube-proxy's DNAT of the ClusterIP.
type kubeProxyMode string

const (
	// iptablesMode: KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP in nat, loaded
	// with the sidecar's own backend.
	iptablesMode kubeProxyMode = "iptables-mode"
	// nftablesMode: a table of its own with a service-ips verdict map,
	// loaded with nft.
	nftablesMode kubeProxyMode = "nftables-mode"
)

// newClientNode returns a node and a pod namespace joined by veth, the
// node's firewall dropping by default (see below) and kube-proxy's DNAT of
// fam.clusterIP:443 to the proxy address in mode's shape loaded.
func newClientNode(t *testing.T, backend string, fam family, mode kubeProxyMode) (node, pod *netnstest.NS) {
	t.Helper()
	node, pod = netnstest.New(t), netnstest.New(t)
	netnstest.Veth(t, node, pod, "veth-node", "veth-pod")
	addVethAddr(t, node, "veth-node", fam.node)
	addVethAddr(t, pod, "veth-pod", fam.client)
	pod.Run(t, "ip", "route", "add", "default", "via", fam.node.Addr().String())
	node.Run(t, "ip", "route", "add", fam.serviceRange.String(), "via", fam.client.Addr().String())

	// The node's firewall: drop by default; accept what conntrack knows,
	// loopback (as distributions' firewalls do), neighbour discovery
	// (IPv6: conntrack leaves it untracked, see testTraffic) and the
	// control port.
	ipt := fam.iptables + "-" + backend
	node.Run(t, ipt, "-P", "INPUT", "DROP")
	node.Run(t, ipt, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
	node.Run(t, ipt, append([]string{"-A"}, loopbackAccept...)...)
	if fam.proxy.Is6() {
		node.Run(t, ipt, "-A", "INPUT", "-p", "ipv6-icmp", "-j", "ACCEPT")
	}
	node.Run(t, ipt, "-A", "INPUT", "-p", "tcp", "--dport", strconv.Itoa(controlPort), "-j", "ACCEPT")
	loadKubeProxy(t, node, backend, fam, mode)
	return node, pod
}

// loopbackAccept is the node's rule, in INPUT, that accepts traffic on lo.
var loopbackAccept = []string{"INPUT", "-i", "lo", "-j", "ACCEPT"}

// loadKubeProxy loads, in ns, kube-proxy's rules for a ClusterIP Service
// fam.clusterIP:443 with one endpoint, the proxy's address:443, in the
// shape mode gives. iptables mode is loaded with backend's restore program.
func loadKubeProxy(t *testing.T, ns *netnstest.NS, backend string, fam family, mode kubeProxyMode) {
	t.Helper()
	dir := t.TempDir()
	var path string
	switch mode {
	case iptablesMode:
		path = filepath.Join(dir, "kube-proxy.rules")
		writeFile(t, path, kubeproxy.KubernetesService(netip.AddrPortFrom(fam.clusterIP, 443), netip.AddrPortFrom(fam.proxy, proxyPort)))
		ns.Run(t, fam.iptables+"-"+backend+"-restore", "--noflush", path)
	case nftablesMode:
		path = filepath.Join(dir, "kube-proxy.nft")
		writeFile(t, path, kubeProxyNFTables(fam))
		ns.Run(t, "nft", "-f", path)
	default:
		t.Fatalf("unknown kube-proxy mode %q", mode)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// kubeProxyNFTables is what kube-proxy in nftables mode writes for the
// `kubernetes` Service with one endpoint, as nft -f input: a table of its
// own, a verdict map from ClusterIP, protocol and port to the Service's
// chain, and an endpoint chain that DNATs.
func kubeProxyNFTables(fam family) string {
	table, addrType, ip := "ip", "ipv4_addr", "ip"
	if fam.proxy.Is6() {
		table, addrType, ip = "ip6", "ipv6_addr", "ip6"
	}
	endpoint := netip.AddrPortFrom(fam.proxy, proxyPort).String()
	svc := "service-2QRHZV4L-default/kubernetes/tcp/https"
	ep := "endpoint-5OJB2KTY-default/kubernetes/tcp/https__" + strings.NewReplacer(":", ".", "[", "", "]", "").Replace(endpoint)
	return fmt.Sprintf(`table %[1]s kube-proxy {
	comment "rules for kube-proxy"
	chain mark-for-masquerade {
		meta mark set meta mark | 0x4000
	}
	chain masquerading {
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}
	map service-ips {
		type %[2]s . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
	}
	chain services {
		%[3]s daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}
	chain %[7]s {
		%[3]s saddr %[5]s jump mark-for-masquerade
		meta l4proto tcp dnat to %[6]s
	}
	chain %[8]s {
		numgen random mod 1 vmap { 0 : goto %[7]s }
	}
}
add element %[1]s kube-proxy service-ips { %[4]s . tcp . 443 : goto %[8]s }
`, table, addrType, ip, fam.clusterIP, fam.proxy, endpoint, ep, svc)
}

// addVethAddr adds p to dev in ns; an IPv6 address without duplicate
// address detection, so it is usable at once.
func addVethAddr(t *testing.T, ns *netnstest.NS, dev string, p netip.Prefix) {
	t.Helper()
	args := []string{"addr", "add", p.String(), "dev", dev}
	if p.Addr().Is6() {
		args = append(args, "nodad")
	}
	ns.Run(t, "ip", args...)
}

// echoServer is an echo server that remembers which clients it served.
type echoServer struct {
	mu    sync.Mutex
	peers map[netip.AddrPort]bool
}

// serveEcho serves, inside ns, an echo server on addr until the test ends.
// It binds with IP_FREEBIND, as a proxy does that must listen on an
// address before the node has it: the ClusterIP is on the node only while
// it is intercepted.
func serveEcho(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) *echoServer {
	t.Helper()
	lc := net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if addr.Addr().Is4() {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var ln net.Listener
	if err := ns.Do(t, func() error {
		var err error
		ln, err = lc.Listen(t.Context(), "tcp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns.Name, err)
	}
	s := &echoServer{peers: make(map[netip.AddrPort]bool)}
	netnstest.Serve(t, ln, func(c net.Conn) {
		s.mu.Lock()
		s.peers[tcpAddrPort(c.RemoteAddr())] = true
		s.mu.Unlock()
		// A client that keeps its connection open until the test ends is
		// cut off at cleanup; the deadline ends one whose FIN never
		// arrives before that.
		_ = c.SetDeadline(time.Now().Add(2 * echoTimeout))
		_, _ = io.Copy(c, c)
	})
	return s
}

// served reports whether s accepted a connection from peer.
func (s *echoServer) served(peer netip.AddrPort) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peers[peer]
}

// dialFrom connects from inside ns to addr. A connection is closed when the
// test ends, if not before.
func dialFrom(t *testing.T, ns *netnstest.NS, addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := ns.Do(t, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: timeout}).Dial("tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, nil
}

// mustEcho connects from inside ns to the echo server at addr, writes a
// message and requires the same bytes back. It returns the connection, left
// open until the test ends.
func mustEcho(t *testing.T, ns *netnstest.NS, addr netip.AddrPort, what string) net.Conn {
	t.Helper()
	c, err := dialFrom(t, ns, addr, echoTimeout)
	if err != nil {
		t.Fatalf("%s: dialing %s: %v", what, addr, err)
	}
	if err := c.SetDeadline(time.Now().Add(echoTimeout)); err != nil {
		t.Fatal(err)
	}
	msg := []byte("echo " + what + " via " + addr.String())
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("%s: writing to %s: %v", what, addr, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("%s: reading back from %s: %v (got %q)", what, addr, err, got)
	}
	if string(got) != string(msg) {
		t.Fatalf("%s: %s echoed %q, want %q", what, addr, got, msg)
	}
	return c
}

// mustBeDropped requires a dial from inside ns to addr to time out, as it
// does when the SYN is dropped. A refusal or any other error would mean
// something else is wrong.
func mustBeDropped(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	c, err := dialFrom(t, ns, addr, droppedDialTimeout)
	if err == nil {
		t.Fatalf("connected to %s from %s -> %s; want the SYN dropped", addr, c.LocalAddr(), c.RemoteAddr())
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("dialing %s: %v; want a timeout (SYN dropped)", addr, err)
	}
}

// probeResult is one dial and echo round trip.
type probeResult struct {
	target netip.AddrPort
	// local is the client's end of the connection; when it never
	// connected, the source address the node's routing picks for target,
	// with port 0.
	local   netip.AddrPort
	err     error
	timeout bool
}

// probe dials target from inside ns and exchanges a message with the echo
// server there, then closes the connection. It may run in any goroutine:
// it reports instead of failing the test.
func probe(t *testing.T, ns *netnstest.NS, target netip.AddrPort, timeout time.Duration) probeResult {
	r := probeResult{target: target}
	c, err := dialFrom(t, ns, target, timeout)
	if err != nil {
		r.err = err
		var ne net.Error
		r.timeout = errors.As(err, &ne) && ne.Timeout()
		r.local = netip.AddrPortFrom(sourceFor(t, ns, target), 0)
		return r
	}
	defer c.Close()
	r.local = tcpAddrPort(c.LocalAddr())
	if err := c.SetDeadline(time.Now().Add(echoTimeout)); err != nil {
		r.err = err
		return r
	}
	msg := []byte("echo via " + target.String())
	if _, err := c.Write(msg); err != nil {
		r.err = fmt.Errorf("writing: %w", err)
		return r
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		r.err = fmt.Errorf("reading back: %w (got %q)", err, got)
		return r
	}
	if string(got) != string(msg) {
		r.err = fmt.Errorf("echoed %q, want %q", got, msg)
	}
	return r
}

// sourceFor is the source address ns's routing picks for a connection to
// target, found by connecting a UDP socket (which sends nothing). A TCP
// connection picks the same, before nat OUTPUT can rewrite its destination.
func sourceFor(t *testing.T, ns *netnstest.NS, target netip.AddrPort) netip.Addr {
	var src netip.Addr
	err := ns.Do(t, func() error {
		c, err := net.Dial("udp", target.String())
		if err != nil {
			return err
		}
		defer c.Close()
		src = c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap()
		return nil
	})
	if err != nil {
		return netip.Addr{}
	}
	return src
}

// tcpAddrPort is a's address, unmapped (net gives IPv4 in its 16-byte form),
// and port.
func tcpAddrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// ---- Conntrack ----

// conntrackEntries lists the connections conntrack tracks in ns for family.
func conntrackEntries(t *testing.T, ns *netnstest.NS, family string) []netnstest.ConntrackEntry {
	t.Helper()
	return ns.Conntrack(t, family)
}

// mentions reports whether e has addr as a source or destination in either
// direction, or port as a source or destination port.
func mentions(e netnstest.ConntrackEntry, addr netip.Addr, port uint16) bool {
	for _, ap := range []netip.AddrPort{e.OrigSrc, e.OrigDst, e.ReplySrc, e.ReplyDst} {
		if ap.Addr() == addr || ap.Port() == port {
			return true
		}
	}
	return false
}

// hasConnection reports whether entries hold c, by its original direction:
// from c's local to c's remote address and port.
func hasConnection(entries []netnstest.ConntrackEntry, c net.Conn) bool {
	local, remote := tcpAddrPort(c.LocalAddr()), tcpAddrPort(c.RemoteAddr())
	return slices.ContainsFunc(entries, func(e netnstest.ConntrackEntry) bool {
		return e.OrigSrc == local && e.OrigDst == remote
	})
}

func conntrackLines(entries []netnstest.ConntrackEntry) string {
	lines := make([]string, len(entries))
	for i, e := range entries {
		lines[i] = e.Line
	}
	return strings.Join(lines, "\n")
}
