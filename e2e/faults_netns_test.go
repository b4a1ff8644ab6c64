package e2e

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// The fault-injection tests below break what the sidecar depends on (the
// xtables lock, the rules it owns, the iptables programs) while it runs as
// a daemon in a namespace, and check that it never loses a rule, never
// leaves a half-applied or duplicated ruleset, keeps running, says what
// went wrong, and converges once the fault is gone. They log what they
// measure (time to converge, failed attempts) with t.Logf.

// toolShims puts, for each program, a script into a directory of its own
// that runs the real program unless the mode file the test writes says
// otherwise:
//
//	fail     exit 1 with a message on stderr
//	hang        sleep an hour (exec: the process the sidecar started
//	            sleeps), after creating the file MODE.hung
//	hang-child  the same, but in a child process that inherits the
//	            output, as a wrapper script's program would
//	garbage  print a line that is no iptables output and exit 0
//
// A removed script is a program missing from PATH: the directory is the
// daemon's whole PATH.
type toolShims struct {
	*shims
	modes string
}

func newToolShims(t *testing.T, progs ...string) *toolShims {
	t.Helper()
	s := &toolShims{shims: newShims(t), modes: t.TempDir()}
	for _, prog := range progs {
		s.install(t, prog)
	}
	t.Cleanup(func() { s.killHung(t) })
	return s
}

// killHung kills the sleeps of hung programs that are still running: the
// sidecar kills the program it started, not a child that program left
// behind.
func (s *toolShims) killHung(t *testing.T) {
	pids, _ := filepath.Glob(filepath.Join(s.modes, "*.pid"))
	for _, f := range pids {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Error(err)
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Error(err)
			continue
		}
		// Only if that pid is still our sleep.
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && string(cmdline) == "/bin/sleep\x003600\x00" {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Errorf("killing the hung program's sleep %d: %v", pid, err)
			}
		}
	}
}

func (s *toolShims) install(t *testing.T, prog string) {
	t.Helper()
	s.write(t, prog, fmt.Sprintf(`mode=
[ -f %[1]s ] && read -r mode < %[1]s
case "$mode" in
fail) echo "%[2]s: injected failure: Permission denied (you must be root)" >&2; exit 1 ;;
hang) : > %[1]s.hung; echo $$ > %[1]s.pid; exec /bin/sleep 3600 ;;
hang-child) : > %[1]s.hung; /bin/sleep 3600 & echo $! > %[1]s.pid; wait; exit 0 ;;
garbage) echo "garbage: this is no iptables output"; exit 0 ;;
esac
exec REAL "$@"
`, filepath.Join(s.modes, prog), prog))
}

// hung reports whether prog has been started in mode "hang".
func (s *toolShims) hung(prog string) bool {
	_, err := os.Stat(filepath.Join(s.modes, prog) + ".hung")
	return err == nil
}

// set puts prog into mode: "real", "fail", "hang", "garbage" or "missing".
func (s *toolShims) set(t *testing.T, prog, mode string) {
	t.Helper()
	if mode == "missing" {
		if err := os.Remove(filepath.Join(s.dir, prog)); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := os.Stat(filepath.Join(s.dir, prog)); os.IsNotExist(err) {
		s.install(t, prog)
	}
	// Renamed into place: a shim never reads a half-written mode.
	tmp := filepath.Join(s.modes, prog+".new")
	if err := os.WriteFile(tmp, []byte(mode+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.modes, prog)); err != nil {
		t.Fatal(err)
	}
}

// TestFaultFailingTools makes one iptables program of the backend in use
// fail, hang, print garbage or go missing while our rules have drifted, and
// checks that the sidecar logs and counts the failure, never leaves a
// state but the drifted one or the whole ruleset, keeps running, and
// converges at the next sync once the program works again.
//
// A hung program is killed after --iptables-timeout, the shortest allowed
// here (6s), so each hang case costs that long; they run for nft only.
func TestFaultFailingTools(t *testing.T) {
	progs := []string{"iptables-nft", "iptables-nft-save", "iptables-nft-restore", "iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"}
	bin := e2eTest(t, progs...)
	for _, tc := range []struct {
		backend, prog, mode string
	}{
		{"nft", "iptables-nft-restore", "fail"},
		{"nft", "iptables-nft-restore", "hang"},
		{"nft", "iptables-nft-restore", "hang-child"},
		{"nft", "iptables-nft-restore", "garbage"},
		{"nft", "iptables-nft-restore", "missing"},
		{"nft", "iptables-nft", "fail"},
		{"nft", "iptables-nft", "hang"},
		{"nft", "iptables-nft", "garbage"},
		{"nft", "iptables-nft", "missing"},
		{"legacy", "iptables-legacy-restore", "fail"},
		{"legacy", "iptables-legacy-restore", "garbage"},
		{"legacy", "iptables-legacy-restore", "missing"},
		{"legacy", "iptables-legacy-save", "fail"},
		{"legacy", "iptables-legacy-save", "garbage"},
		{"legacy", "iptables-legacy-save", "missing"},
	} {
		t.Run(tc.prog+"/"+tc.mode, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			shims := newToolShims(t, progs...)
			d := startDaemonEnv(t, ns, []string{shims.pathOnly()}, bin,
				"--ip-address", "10.96.0.2", "--setup-iptables", "--iptables-backend", tc.backend,
				"--sync-interval", "300ms", "--unsafe-short-sync-interval", "--iptables-timeout", "6s", "-v", "2", "--metrics-bind-address", metricsAddr)
			want := wantIPv4State(t, tc.backend)
			eventually(t, "first sync", func() bool { return slices.Equal(ipv4State(t, ns, tc.backend), want) })
			// The rules can be in place before the start-up sync has logged
			// its repairs: the mark below is taken after that.
			d.startupSynced(t)
			metricsServed(t, ns, metricsAddr)
			syncsFailedBefore, restoresFailedBefore := metric(t, ns, syncFailures), metric(t, ns, restoreFailures)

			// The fault, then drift for the sidecar to repair through it.
			shims.set(t, tc.prog, tc.mode)
			mark := len(d.log())
			// One transaction: the sidecar sees all of the drift or none.
			// A foreign rule in our chain with a match neither backend's
			// in-process reader renders (a comment) is what only the
			// programs can tell: iptables-nft lists the chain, and
			// iptables-legacy-save the table.
			restoreIn(t, ns, nil, "iptables-"+tc.backend+"-restore", `*filter
:APISERVER-PROXY-INPUT - [0:0]
-A APISERVER-PROXY-INPUT -s 192.0.2.1/32 -m comment --comment foreign -j DROP
-D OUTPUT -j APISERVER-PROXY-OUTPUT
COMMIT
`)
			drifted := ipv4State(t, ns, tc.backend)

			// A hang ends as soon as the program hangs: the one the
			// sidecar started stays hung until the sidecar kills it, at
			// --iptables-timeout.
			var ended time.Time
			failures := 2
			if strings.HasPrefix(tc.mode, "hang") {
				eventually(t, tc.prog+" hangs", func() bool { return shims.hung(tc.prog) })
				shims.set(t, tc.prog, "real")
				ended, failures = time.Now(), 1
			}
			// Until the sidecar has failed twice (a retry; once for a
			// hang), every state seen is the drifted one: nothing is
			// half-applied.
			states := 0
			eventually(t, "failed syncs", func() bool {
				got := ipv4State(t, ns, tc.backend)
				if strings.HasPrefix(tc.mode, "hang") {
					// Once the hung program is killed, the retry runs the
					// real one.
					if bad := halfApplied(got, drifted, want); bad != "" {
						t.Fatalf("while %s hangs, %s", tc.prog, bad)
					}
				} else if !slices.Equal(got, drifted) {
					t.Fatalf("while %s is %s, the rules changed to:\n%s\nfrom:\n%s", tc.prog, tc.mode, strings.Join(got, "\n"), strings.Join(drifted, "\n"))
				}
				states++
				d.running(t)
				return d.countLines(mark, "Sync failed; retrying") >= failures
			})
			failedLines := []string{}
			for _, l := range d.logLines(mark) {
				if strings.Contains(l, "Sync failed; retrying") {
					failedLines = append(failedLines, l)
				}
			}
			if !strings.Contains(failedLines[0], tc.prog) {
				t.Errorf("the failure does not name %s:\n%s", tc.prog, failedLines[0])
			}
			t.Logf("%s %s: %d states checked until the failure was logged, none half-applied; first error: %s", tc.prog, tc.mode, states, failedLines[0])
			if n := metric(t, ns, syncFailures) - syncsFailedBefore; n < float64(failures) {
				t.Errorf("%s rose by %v during the fault, want at least %d", syncFailures, n, failures)
			}
			// A restore that exits 0 is not a failed restore; the sync
			// that finds its rules missing right after it is.
			if strings.HasSuffix(tc.prog, "-restore") && tc.mode != "missing" && tc.mode != "garbage" {
				if n := metric(t, ns, restoreFailures) - restoresFailedBefore; n < float64(failures) {
					t.Errorf("%s rose by %v during the fault, want at least %d", restoreFailures, n, failures)
				}
			}
			if n := d.countLines(mark, "Repaired rules"); n != 0 && !strings.HasPrefix(tc.mode, "hang") {
				t.Errorf("%d repairs logged while %s is %s", n, tc.prog, tc.mode)
			}

			// The fault ends: the next sync converges.
			if ended.IsZero() {
				shims.set(t, tc.prog, "real")
				ended = time.Now()
			}
			failedBefore := d.countLines(mark, "Sync failed; retrying")
			eventually(t, "converged after the fault", func() bool {
				got := ipv4State(t, ns, tc.backend)
				if bad := halfApplied(got, drifted, want); bad != "" {
					t.Fatalf("after %s %s, %s", tc.prog, tc.mode, bad)
				}
				return slices.Equal(got, want)
			}, within(deadline+40*time.Second))
			took := time.Since(ended)
			eventually(t, "success logged", func() bool { return d.countLines(mark, "Sync succeeded again") > 0 })
			d.running(t)
			t.Logf("%s %s: %d failed syncs in all (%d after the fault ended), converged %v after it ended (300ms interval)",
				tc.prog, tc.mode, d.countLines(mark, "Sync failed; retrying"), d.countLines(mark, "Sync failed; retrying")-failedBefore, took.Round(time.Millisecond))
		})
	}
}

// flock takes an exclusive lock on the file at path, as iptables does on
// the xtables lock, and returns a function that releases it.
func flock(t *testing.T, path string) func() {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release := func() {
		once.Do(func() {
			if err := syscall.Flock(int(f.Fd()), syscall.LOCK_UN); err != nil {
				t.Error(err)
			}
			f.Close()
		})
	}
	t.Cleanup(release)
	return release
}

// restoreIn loads payload with prog (an iptables-restore) --noflush in ns,
// with extra environment variables.
func restoreIn(t *testing.T, ns *netnstest.NS, env []string, prog, payload string) {
	t.Helper()
	cmd := ns.Command(prog, "--noflush", "--wait=60")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(payload)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s --noflush: %v\n%s\n%s", prog, err, out, payload)
	}
}

// runEnv runs name with args in ns with extra environment variables.
func runEnv(t *testing.T, ns *netnstest.NS, env []string, name string, args ...string) string {
	t.Helper()
	cmd := ns.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestFaultXtablesLockHeld holds the xtables lock (a private lock file the
// sidecar is pointed at) for 10s while our rules have drifted, with the
// legacy backend, the one that takes it. The sidecar's writes wait, give
// up and are retried; nothing is written, so nothing is duplicated, while
// the lock is held; once it is released the rules converge.
func TestFaultXtablesLockHeld(t *testing.T) {
	bin := e2eTest(t, "iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore")
	const hold = 10 * time.Second
	ns := netnstest.New(t)
	dir := t.TempDir()
	lock := filepath.Join(dir, "xtables.lock")
	// The test's own iptables calls use another lock file, so they can
	// write while the sidecar's lock is held.
	testEnv := []string{"XTABLES_LOCKFILE=" + filepath.Join(dir, "test.lock")}
	d := startDaemonEnv(t, ns, []string{"XTABLES_LOCKFILE=" + lock}, bin,
		"--ip-address", "10.96.0.2", "--setup-iptables", "--iptables-backend", "legacy",
		"--sync-interval", "1s", "-v", "2", "--metrics-bind-address", metricsAddr)
	want := wantIPv4State(t, "legacy")
	eventually(t, "first sync", func() bool { return slices.Equal(ipv4State(t, ns, "legacy"), want) })
	// As in TestFaultFailingTools: the mark below counts none of the
	// start-up's repairs.
	d.startupSynced(t)
	metricsServed(t, ns, metricsAddr)
	restoresFailedBefore, lockWaitsBefore := metric(t, ns, restoreFailures), metric(t, ns, lockWaits)

	release := flock(t, lock)
	held := time.Now()
	mark := len(d.log())
	runEnv(t, ns, testEnv, "iptables-legacy", "-w", "-t", "filter", "-F", "APISERVER-PROXY-INPUT")
	runEnv(t, ns, testEnv, "iptables-legacy", "-w", "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING")
	drifted := ipv4State(t, ns, "legacy")
	if slices.Equal(drifted, want) {
		t.Fatal("the drift did not take")
	}
	// The lock's duration is the fault's, measured on the test's clock.
	freed := make(chan struct{})
	timer := time.AfterFunc(hold, func() { release(); close(freed) })
	defer timer.Stop()
	states := 0
	for time.Since(held) < hold-500*time.Millisecond {
		if got := ipv4State(t, ns, "legacy"); !slices.Equal(got, drifted) {
			t.Fatalf("while the xtables lock is held, the rules changed to:\n%s", strings.Join(got, "\n"))
		}
		states++
		d.running(t)
		time.Sleep(50 * time.Millisecond) // sampling interval of the state check
	}
	failed := d.countLines(mark, "Sync failed; retrying")
	lockHeld := d.countLines(mark, "lockHeld=true")
	t.Logf("xtables lock held for %v: %d failed syncs logged meanwhile (%d with lockHeld=true), %d states checked, all the drifted one",
		hold, failed, lockHeld, states)
	if failed < 1 || lockHeld < 1 {
		t.Errorf("%d failed syncs, %d with lockHeld=true while the lock was held, want at least one:\n%s", failed, lockHeld, d.log()[mark:])
	}
	if d.countLines(mark, "Another app is currently holding the xtables lock") < 1 {
		t.Errorf("the log does not carry iptables' own message about the lock:\n%s", d.log()[mark:])
	}
	if n := d.countLines(mark, "Repaired rules"); n != 0 {
		t.Errorf("%d repairs logged while nothing could be written:\n%s", n, d.log()[mark:])
	}

	<-freed
	released := time.Now()
	eventually(t, "converged after the lock was released", func() bool {
		got := ipv4State(t, ns, "legacy")
		if bad := halfApplied(got, drifted, want); bad != "" {
			t.Fatalf("after the lock was released, %s", bad)
		}
		return slices.Equal(got, want)
	})
	took := time.Since(released)
	eventually(t, "success logged", func() bool { return d.countLines(mark, "Sync succeeded again") > 0 })
	if n := metric(t, ns, lockWaits) - lockWaitsBefore; n < 1 {
		t.Errorf("%s rose by %v, want at least 1", lockWaits, n)
	}
	if n := metric(t, ns, restoreFailures) - restoresFailedBefore; n < 1 {
		t.Errorf("%s rose by %v, want at least 1", restoreFailures, n)
	}
	t.Logf("xtables lock released: converged %v later, after %d failed syncs in all (--wait=5, 1s interval); %s +%v, %s +%v",
		took.Round(time.Millisecond), d.countLines(mark, "Sync failed; retrying"),
		lockWaits, metric(t, ns, lockWaits)-lockWaitsBefore, restoreFailures, metric(t, ns, restoreFailures)-restoresFailedBefore)
	d.running(t)
}

// halfApplied returns what is wrong when a table of got (ipv4State lines,
// each starting with its listing program and table) is neither as in
// drifted nor as in want, or "" when every table is one or the other.
func halfApplied(got, drifted, want []string) string {
	g, d, w := stateGroups(got), stateGroups(drifted), stateGroups(want)
	tables := slices.Sorted(maps.Keys(w))
	for key := range d {
		if !slices.Contains(tables, key) {
			tables = append(tables, key)
		}
	}
	for _, tb := range tables {
		if !slices.Equal(g[tb], d[tb]) && !slices.Equal(g[tb], w[tb]) {
			return fmt.Sprintf("table %s is neither as before nor as rendered:\n%s", tb, strings.Join(g[tb], "\n"))
		}
	}
	return ""
}

// foreignWriter is a kube-proxy-like writer: each round it rewrites its
// own chains in nat and filter whole (10,000 rules in all), and replaces
// the rules it keeps in the built-in chains we also jump from (some
// inserted at the top, some appended), in batches of iptables-restore
// --noflush.
type foreignWriter struct {
	ns      *netnstest.NS
	restore string
	env     []string
	round   int
	// last is what the last successful round left: per table, the rules
	// of the writer's chains in order, and its rules in built-in chains.
	last map[string]foreignState
}

type foreignState struct {
	chains  []string // "-A FOREIGN-..." lines in order
	builtin []string // rules in built-in chains, sorted
}

const (
	foreignBatches  = 4
	foreignPerChain = 1250 // 2 tables x 4 batches x 1250 = 10,000 rules
)

// builtinRules are the writer's rules in built-in chains in a round: two
// inserted at the top and two appended per chain, plus the jumps to its
// own chains.
func builtinRules(table string, round int) (top, bottom, jumps []string) {
	verdict := "ACCEPT"
	chains := []string{"INPUT", "OUTPUT"}
	if table == "nat" {
		verdict, chains = "RETURN", []string{"PREROUTING", "OUTPUT"}
	}
	src := fmt.Sprintf("192.0.2.%d/32", round%250+1)
	for _, c := range chains {
		for i := range 2 {
			top = append(top, fmt.Sprintf("%s -s %s -p tcp -m tcp --dport %d -j %s", c, src, 2001+i, verdict))
			bottom = append(bottom, fmt.Sprintf("%s -s %s -p tcp -m tcp --dport %d -j %s", c, src, 3001+i, verdict))
		}
	}
	for b := range foreignBatches {
		jumps = append(jumps, fmt.Sprintf("%s -j %s", chains[0], foreignChain(table, b)))
	}
	return top, bottom, jumps
}

func foreignChain(table string, batch int) string {
	return fmt.Sprintf("FOREIGN-%s-%d", strings.ToUpper(table), batch)
}

// write runs one round: each batch rewrites one chain per table; the
// first also replaces the rules in the built-in chains.
func (w *foreignWriter) write() error {
	next := map[string]foreignState{}
	for b := range foreignBatches {
		var p strings.Builder
		for _, table := range []string{"nat", "filter"} {
			verdict := "ACCEPT"
			if table == "nat" {
				verdict = "RETURN"
			}
			fmt.Fprintf(&p, "*%s\n", table)
			chain := foreignChain(table, b)
			fmt.Fprintf(&p, ":%s - [0:0]\n", chain)
			st := next[table]
			for i := range foreignPerChain {
				rule := fmt.Sprintf("-A %s -d 198.18.%d.%d/32 -p tcp -m tcp --dport %d -j %s",
					chain, b*5+i/250, i%250+1, 1024+w.round%60000, verdict)
				st.chains = append(st.chains, rule)
				p.WriteString(rule + "\n")
			}
			if b == 0 {
				top, bottom, jumps := builtinRules(table, w.round)
				if w.round > 0 {
					oldTop, oldBottom, _ := builtinRules(table, w.round-1)
					for _, r := range append(oldTop, oldBottom...) {
						p.WriteString("-D " + r + "\n")
					}
				}
				for _, r := range top {
					p.WriteString("-I " + r + "\n")
				}
				for _, r := range bottom {
					p.WriteString("-A " + r + "\n")
				}
				for _, r := range slices.Concat(top, bottom, jumps) {
					st.builtin = append(st.builtin, "-A "+r)
				}
				slices.Sort(st.builtin)
			}
			if w.round == 0 {
				_, _, jumps := builtinRules(table, 0)
				p.WriteString("-A " + jumps[b] + "\n")
			}
			next[table] = st
			p.WriteString("COMMIT\n")
		}
		cmd := w.ns.Command(w.restore, "--noflush", "--wait=60")
		cmd.Env = append(os.Environ(), w.env...)
		cmd.Stdin = strings.NewReader(p.String())
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("round %d, batch %d: %s: %v: %s", w.round, b, w.restore, err, out)
		}
	}
	w.last = next
	w.round++
	return nil
}

// foreignSaved is what iptables-save of backend lists of the writer's
// rules in table.
func foreignSaved(t *testing.T, ns *netnstest.NS, env []string, backend, table string) foreignState {
	t.Helper()
	var st foreignState
	for _, line := range strings.Split(runEnv(t, ns, env, "iptables-"+backend+"-save", "-t", table), "\n") {
		rest, ok := strings.CutPrefix(line, "-A ")
		if !ok {
			continue
		}
		chain, _, _ := strings.Cut(rest, " ")
		switch {
		case strings.HasPrefix(chain, "FOREIGN-"):
			st.chains = append(st.chains, line)
		case !strings.HasPrefix(chain, render.ChainPrefix) && !strings.Contains(line, render.ChainPrefix):
			st.builtin = append(st.builtin, line)
		}
	}
	slices.Sort(st.builtin)
	return st
}

// TestFaultConcurrentWriterAndFlushStorm runs a kube-proxy-like writer
// that rewrites 10,000 foreign rules in nat and filter, round after round,
// while the test flushes our chains and deletes our jumps every 100ms. At
// the end every foreign rule the writer last wrote is there exactly once,
// ours are whole and there exactly once, and the sidecar logs no error
// once the storm is over. The storm lasts 30s with nft and 15s with
// legacy, whose repairs wait for the next interval.
func TestFaultConcurrentWriterAndFlushStorm(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-nft-restore", "iptables-legacy", "iptables-legacy-restore", "ip6tables-nft", "ip6tables-legacy")
	for _, tc := range []struct {
		backend string
		storm   time.Duration
	}{
		{"nft", 30 * time.Second},
		{"legacy", 15 * time.Second},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			// Everything in this namespace shares a private xtables lock,
			// as the agents of a node share the host's.
			env := []string{"XTABLES_LOCKFILE=" + filepath.Join(t.TempDir(), "xtables.lock")}
			d := startDaemonEnv(t, ns, env, bin, "--ip-address", "10.96.0.2,fd00::2", "--setup-iptables",
				"--iptables-backend", tc.backend, "--sync-interval", "500ms", "--unsafe-short-sync-interval", "-v", "2", "--metrics-bind-address", metricsAddr)
			want := wantState(t, tc.backend)
			eventually(t, "first sync", func() bool { return slices.Equal(ourState(t, ns, tc.backend), want) })

			w := &foreignWriter{ns: ns, restore: "iptables-" + tc.backend + "-restore", env: env}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var writeErr error
			writerDone := make(chan struct{})
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer close(writerDone)
				for {
					select {
					case <-stop:
						return
					default:
					}
					if err := w.write(); err != nil {
						writeErr = err
						return
					}
				}
			}()
			ipt := "iptables-" + tc.backend
			storm := [][]string{
				{ipt, "-w", "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
				{ipt, "-w", "-t", "raw", "-F", "APISERVER-PROXY-PREROUTING"},
				{ipt, "-w", "-t", "filter", "-F", "APISERVER-PROXY-OUTPUT"},
				{ipt, "-w", "-t", "raw", "-F", "APISERVER-PROXY-OUTPUT"},
				{ipt, "-w", "-t", "filter", "-D", "INPUT", "-j", "APISERVER-PROXY-INPUT"},
				{ipt, "-w", "-t", "raw", "-D", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"},
			}
			mark := len(d.log())
			started := time.Now()
			flushes, missed := 0, 0
			tick := time.NewTicker(100 * time.Millisecond)
		storming:
			for time.Since(started) < tc.storm {
				select {
				case <-tick.C:
				case <-writerDone:
					break storming
				}
				c := storm[flushes%len(storm)]
				cmd := ns.Command(c[0], c[1:]...)
				cmd.Env = append(os.Environ(), env...)
				if err := cmd.Run(); err != nil {
					missed++ // a jump already deleted and not yet repaired
				}
				flushes++
				d.running(t)
			}
			tick.Stop()
			close(stop)
			wg.Wait()
			if writeErr != nil {
				t.Fatalf("the foreign writer failed (did a foreign rule go missing?): %v", writeErr)
			}
			// One last write, with the storm over.
			if err := w.write(); err != nil {
				t.Fatalf("the foreign writer's last write: %v", err)
			}
			stormEnd := len(d.log())
			ended := time.Now()
			duringStorm := d.log()[mark:stormEnd]
			errorsDuring := 0
			for _, l := range strings.Split(duringStorm, "\n") {
				if isErrorLine(l) {
					errorsDuring++
				}
			}

			eventually(t, "our rules converged after the storm", func() bool {
				return slices.Equal(ourState(t, ns, tc.backend), want)
			})
			took := time.Since(ended)
			// A sync that began during the storm may end after it: errors
			// are allowed up to the first sync that ends after it; then two
			// more syncs must pass without any.
			var after []string
			eventually(t, "three syncs after the storm", func() bool {
				after = d.logLines(stormEnd)
				n := 0
				for _, l := range after {
					if strings.Contains(l, "Sync finished") {
						n++
					}
				}
				return n >= 3
			})
			first := slices.IndexFunc(after, func(l string) bool { return strings.Contains(l, "Sync finished") })
			for _, l := range after[first+1:] {
				if isErrorLine(l) {
					t.Errorf("the sidecar logged an error after the storm: %s", l)
				}
			}
			if got := ourState(t, ns, tc.backend); !slices.Equal(got, want) {
				t.Errorf("our rules after the storm:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			for _, table := range []string{"nat", "filter"} {
				got := foreignSaved(t, ns, env, tc.backend, table)
				if !slices.Equal(got.chains, w.last[table].chains) {
					t.Errorf("%s: the writer's chains hold %d rules, not the %d it last wrote", table, len(got.chains), len(w.last[table].chains))
				}
				if !slices.Equal(got.builtin, w.last[table].builtin) {
					t.Errorf("%s: the writer's rules in built-in chains:\n%s\nwant:\n%s", table, strings.Join(got.builtin, "\n"), strings.Join(w.last[table].builtin, "\n"))
				}
			}
			syncs := strings.Count(duringStorm, "Sync finished")
			t.Logf("%s: %v storm, %d writer rounds of 10,000 rules, %d flushes/deletes (%d found nothing to delete); the sidecar ran %d syncs, %d repairs logged, %d errors logged (all during the storm); converged %v after the storm",
				tc.backend, tc.storm, w.round, flushes, missed, syncs, strings.Count(duringStorm, "Repaired rules"), errorsDuring, took.Round(time.Millisecond))
			if errorsDuring > 0 {
				for _, l := range strings.Split(duringStorm, "\n") {
					if isErrorLine(l) {
						t.Logf("error during the storm: %s", l)
						break
					}
				}
			}
		})
	}
}
