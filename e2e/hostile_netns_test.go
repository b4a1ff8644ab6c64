package e2e

import (
	"fmt"
	"math/rand/v2"
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
)

// The tests in this file inject faults: the sidecar killed at random
// points, two instances on one node, other agents and operators changing
// the node under it, and iptables listings in forms it does not expect.
// Each logs what it measured (restarts, time to converge, writes counted).

// hostileMedianMax returns the middle of ds, and the largest.
func hostileMedianMax(ds []time.Duration) (time.Duration, time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

// hostileSeed is the seed of the fault injection: HOSTILE_SEED to replay a
// run, else the time.
func hostileSeed(t *testing.T) uint64 {
	t.Helper()
	if s := os.Getenv("HOSTILE_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("HOSTILE_SEED=%q: %v", s, err)
		}
		return seed
	}
	return uint64(time.Now().UnixNano())
}

// crashDrifts are the changes injected into a node holding the dual-stack
// ruleset, with programs of backend. Each may fail when the state it
// expects is not there (the sidecar was killed before writing it): that
// is part of the game.
func crashDrifts(backend string) [][]string {
	ipt, ip6t := "iptables-"+backend, "ip6tables-"+backend
	return [][]string{
		{ipt, "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
		{ip6t, "-t", "raw", "-F", "APISERVER-PROXY-OUTPUT"},
		{ipt, "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING"},
		{ip6t, "-t", "filter", "-D", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"},
		{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"},
		{"ip", "addr", "del", "fd00::2/128", "dev", "lo"},
		{ipt, "-t", "filter", "-A", "APISERVER-PROXY-OUTPUT", "-s", "192.0.2.66/32", "-j", "ACCEPT"},
		{ipt, "-t", "filter", "-I", "INPUT", "-j", "APISERVER-PROXY-INPUT"},
	}
}

// TestCrashesConverge kills the daemon with SIGKILL at random points, over
// about 200 syncs, with drift injected both between the restarts and while
// it runs; every restart must converge to exactly one copy of everything.
// Some kills land right after the start, during the first sync and its
// write; the others after a drift, during its repair or right after.
func TestCrashesConverge(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	seed := hostileSeed(t)
	t.Logf("seed %d (HOSTILE_SEED=%d replays the same choices of drifts and kill points)", seed, seed)
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(seed, 0))
			ns := netnstest.New(t)
			whole := wholeCheck(t, ns, backend)
			all := crashDrifts(backend)
			drift := func() bool {
				d := all[rng.IntN(len(all))]
				_, err := ns.RunErr(d[0], d[1:]...)
				return err == nil
			}
			args := []string{"--ip-address", dualStack, "--setup-iptables", "--iptables-backend", backend,
				"--sync-interval", "10ms", "--unsafe-short-sync-interval", "-v", "2"}
			var converge []time.Duration
			restarts, kills, early, drifted, total := 0, 0, 0, 0, 0
			for round := 0; (total < 200 || kills < 30) && round < 100; round++ {
				// Between restarts: the node changes while no sidecar runs.
				for range rng.IntN(3) {
					if drift() {
						drifted++
					}
				}
				if rng.IntN(3) == 0 {
					// Killed early: during start-up or its first write.
					d := startDaemon(t, ns, bin, args...)
					restarts++
					time.Sleep(time.Duration(rng.IntN(30)) * time.Millisecond) // the random kill point
					d.sigkill(t)
					kills++
					early++
					total += d.syncsDone()
				}
				d := startDaemon(t, ns, bin, args...)
				restarts++
				start := time.Now()
				converge = append(converge, eventually(t, fmt.Sprintf("restart %d converges", restarts), whole, since(start)))
				// While it runs: drift, then a kill at a random point of
				// the repair that follows, or of the idle syncs.
				for range rng.IntN(3) {
					if drift() {
						drifted++
					}
				}
				time.Sleep(time.Duration(rng.IntN(40)) * time.Millisecond) // the random kill point
				d.sigkill(t)
				kills++
				total += d.syncsDone()
			}
			// The last kill, too, is followed by a restart that converges.
			d := startDaemon(t, ns, bin, args...)
			restarts++
			converge = append(converge, eventually(t, "the last restart converges", whole))
			// And it stays converged: no copy of anything piles up later.
			n := d.syncsDone()
			eventually(t, "20 more syncs", func() bool { return d.syncsDone() >= n+20 })
			if got, want := ourState(t, ns, backend), wantState(t, backend); !slices.Equal(got, want) {
				t.Errorf("after the last restart and 20 syncs, our state is\n%q\nwant\n%q", got, want)
			}
			med, most := hostileMedianMax(converge)
			t.Logf("%s: %d restarts, %d SIGKILLs (%d within 30ms of the start), %d drifts injected, %d syncs finished; every restart converged (median %v, max %v)",
				backend, restarts, kills, early, drifted, total, med.Round(time.Millisecond), most.Round(time.Millisecond))
		})
	}
}

// TestSIGTERMDuringSyncThenCleanup stops a daemon running with --cleanup
// while a repair is being written: the write is held back by a shim of the
// restore program until the signal has arrived. The repair must finish,
// then the cleanup remove everything of ours and nothing else; a sampler
// reading the node throughout must never see a table half-written.
func TestSIGTERMDuringSyncThenCleanup(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "bash")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ipt, ip6t := "iptables-"+backend, "ip6tables-"+backend
			foreign := [][]string{
				{ipt, "-t", "filter", "-A", "INPUT", "-s", "192.0.2.9/32", "-j", "DROP"},
				{ipt, "-t", "raw", "-A", "PREROUTING", "-s", "192.0.2.9/32", "-j", "ACCEPT"},
				{ip6t, "-t", "filter", "-A", "OUTPUT", "-d", "2001:db8::9/128", "-j", "DROP"},
			}
			for _, r := range foreign {
				ns.Run(t, r[0], r[1:]...)
			}

			// The IPv4 restore waits, while the gate file exists, until
			// a line is written to the fifo.
			sh := newShims(t)
			work := t.TempDir()
			gate, started, fifo := filepath.Join(work, "gate"), filepath.Join(work, "started"), filepath.Join(work, "fifo")
			if err := syscall.Mkfifo(fifo, 0o600); err != nil {
				t.Fatal(err)
			}
			sh.write(t, ipt+"-restore", fmt.Sprintf("if [ -e %s ]; then\n  : > %s\n  read -r _ < %s\nfi\nexec REAL \"$@\"\n", gate, started, fifo))

			d := startDaemonEnv(t, ns, []string{sh.pathFirst()}, bin, "--ip-address", dualStack, "--setup-iptables",
				"--iptables-backend", backend, "--sync-interval", "50ms", "--unsafe-short-sync-interval", "--cleanup", "-v", "2")
			want := wantState(t, backend)
			eventually(t, "first sync", wholeCheck(t, ns, backend))

			// What a table may look like at any point: as rendered, as
			// drifted below (for IPv4's filter), or without anything of ours.
			wantGroups := stateGroups(want)
			filter4 := ipt + "-save *filter"
			var flushed []string
			for _, line := range wantGroups[filter4] {
				if !strings.Contains(line, "-A APISERVER-PROXY-INPUT ") {
					flushed = append(flushed, line)
				}
			}
			valid := func(key string, got []string) bool {
				return len(got) == 0 || slices.Equal(got, wantGroups[key]) || (key == filter4 && slices.Equal(got, flushed))
			}
			var (
				mu      sync.Mutex
				samples int
				bad     []string
				errs    []error
			)
			stopSampling := sampleState(ns, backend, func(st []string, err error, _ time.Time) {
				mu.Lock()
				defer mu.Unlock()
				samples++
				if err != nil {
					errs = append(errs, err)
				}
				g := stateGroups(st)
				for key := range wantGroups {
					if !valid(key, g[key]) {
						bad = append(bad, fmt.Sprintf("%s: %q", key, g[key]))
					}
				}
			})

			if err := os.WriteFile(gate, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			ns.Run(t, ipt, "-t", "filter", "-F", "APISERVER-PROXY-INPUT")
			eventually(t, "the repair's restore starts", func() bool {
				_, err := os.Stat(started)
				return err == nil
			})
			if err := os.Remove(gate); err != nil {
				t.Fatal(err)
			}
			// The repair is being written, and held: stop the daemon now.
			if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			signalled := len(d.log())
			w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.WriteString("go\n"); err != nil {
				t.Fatal(err)
			}
			w.Close()
			select {
			case <-d.done:
			case <-time.After(deadline):
				t.Fatal("the sidecar did not exit after SIGTERM")
			}
			stopSampling()

			if code := d.cmd.ProcessState.ExitCode(); code != 0 {
				t.Errorf("exit code %d, want 0", code)
			}
			// The log arrives through a pipe, behind the process: lines
			// written before the signal may come after signalled. Each
			// line is looked for after the one before it.
			after := d.log()[signalled:]
			repaired := strings.Index(after, `drift="rules differ (0 listed, 1 rendered)"`)
			next := func(from int, what string) int {
				if from < 0 {
					return -1
				}
				if i := strings.Index(after[from:], what); i >= 0 {
					return from + i
				}
				return -1
			}
			finished := next(repaired, "Sync finished")
			stopping := next(finished, "Stopping")
			removed := next(stopping, "Removed everything of ours")
			if repaired < 0 || finished < 0 || stopping < 0 || removed < 0 {
				t.Fatalf("want, after the signal, the repair, its sync finished, then Stopping, then the cleanup; log since the signal:\n%s", after)
			}
			if !strings.Contains(after[finished:stopping], "ok=true") {
				t.Errorf("the interrupted sync did not finish well:\n%s", after)
			}
			if left := ourState(t, ns, backend); len(left) != 0 {
				t.Errorf("--cleanup left: %q", left)
			}
			for _, r := range foreign {
				table, chain, spec := r[2], r[4], strings.Join(r[5:], " ")
				if out := ns.Run(t, r[0], "-t", table, "-S", chain); !strings.Contains(out, spec) {
					t.Errorf("foreign rule %q is gone from %s %s:\n%s", spec, table, chain, out)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if len(errs) > 0 {
				t.Errorf("reading the state failed %d times, first: %v", len(errs), errs[0])
			}
			if len(bad) > 0 {
				t.Errorf("%d of %d samples saw a table half-written, first: %s", len(bad), samples, bad[0])
			}
			t.Logf("%s: SIGTERM during a held repair write: the repair finished, then cleanup removed all of ours; %d samples of the node, none half-written", backend, samples)
		})
	}
}

// TestOverlappingInstances runs two daemons with the same flags on one
// node, as during a rolling update with surge. Converged, neither writes.
// When the old one exits with --cleanup the new one puts everything back;
// when it exits without, nothing is ever missing.
func TestOverlappingInstances(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "bash")
	for _, backend := range backends {
		for _, cleanup := range []bool{false, true} {
			name := backend + "/old-exits-without-cleanup"
			if cleanup {
				name = backend + "/old-exits-with-cleanup"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				ns := netnstest.New(t)
				// An hour's interval: every sync below comes from a change
				// the instances notice (nftables events; the legacy
				// tables' info, polled), the new instance's repairs too.
				args := []string{"--ip-address", dualStack, "--setup-iptables", "--iptables-backend", backend,
					"--sync-interval", "1h", "-v", "2"}
				// moreSyncs waits until each instance has finished n more
				// syncs, each triggered by a foreign rule added to a table
				// the instances watch.
				foreign := 0
				moreSyncs := func(n int, ds ...*daemon) {
					t.Helper()
					for range n {
						before := make([]int, len(ds))
						for i, d := range ds {
							before[i] = d.syncsDone()
						}
						foreign++
						src := fmt.Sprintf("198.18.%d.%d/32", foreign/250, foreign%250+1)
						if backend == "nft" {
							ns.Run(t, "iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-s", src, "-j", "ACCEPT")
						} else {
							// Legacy polls only the tables our rules are in.
							ns.Run(t, "iptables-legacy", "-w", "-t", "filter", "-A", "FORWARD", "-s", src, "-j", "ACCEPT")
						}
						eventually(t, "a sync of each", func() bool {
							for i, d := range ds {
								if d.syncsDone() <= before[i] {
									return false
								}
							}
							return true
						})
					}
				}
				oldSh, newSh := newShims(t), newShims(t)
				oldWrites, _ := oldSh.countRuns(t, restoreProgs(backend)...)
				newWrites, _ := newSh.countRuns(t, restoreProgs(backend)...)
				oldArgs := args
				if cleanup {
					oldArgs = append(slices.Clone(args), "--cleanup")
				}
				whole := wholeCheck(t, ns, backend)
				old := startDaemonEnv(t, ns, []string{oldSh.pathFirst()}, bin, oldArgs...)
				eventually(t, "the old instance converges", whole)
				cur := startDaemonEnv(t, ns, []string{newSh.pathFirst()}, bin, args...)
				eventually(t, "the new instance syncs", func() bool { return cur.syncsDone() >= 1 })

				o, n := oldWrites(), newWrites()
				oldSyncs, newSyncs := old.syncsDone(), cur.syncsDone()
				moreSyncs(50, old, cur)
				if w := oldWrites() - o + newWrites() - n; w != 0 {
					t.Errorf("%d iptables-restore runs over 50 syncs of each of two converged instances, want 0", w)
				}
				if !whole() {
					t.Fatalf("two instances: state is %q", ourState(t, ns, backend))
				}
				t.Logf("%s: two instances, converged: %d writes over %d and %d syncs (the new one wrote %d times to converge)",
					backend, oldWrites()-o+newWrites()-n, old.syncsDone()-oldSyncs, cur.syncsDone()-newSyncs, n)

				// The old instance stops; a sampler watches for anything missing.
				want := wantState(t, backend)
				var (
					mu                  sync.Mutex
					samples, incomplete int
					firstGap, lastGap   time.Time
					errs                []error
				)
				stopSampling := sampleState(ns, backend, func(st []string, err error, now time.Time) {
					mu.Lock()
					defer mu.Unlock()
					samples++
					switch {
					case err != nil:
						errs = append(errs, err)
					case !slices.Equal(st, want):
						incomplete++
						if firstGap.IsZero() {
							firstGap = now
						}
						lastGap = now
					}
				})
				signalled := time.Now()
				if code := old.stop(t); code != 0 {
					t.Errorf("the old instance exited %d, want 0", code)
				}
				exited := time.Now()
				var back time.Duration
				if cleanup {
					back = eventually(t, "the new instance puts everything back", whole, since(exited))
				}
				// Keep sampling for a while after the exit: 20 syncs.
				moreSyncs(20, cur)
				stopSampling()
				mu.Lock()
				defer mu.Unlock()
				if len(errs) > 0 {
					t.Errorf("reading the state failed %d times, first: %v", len(errs), errs[0])
				}
				if !cleanup {
					if incomplete > 0 {
						t.Errorf("without --cleanup, %d of %d samples during and after the old instance's exit missed something", incomplete, samples)
					}
					t.Logf("%s: the old instance exited without --cleanup in %v: %d samples of the node during and after, none missing anything",
						backend, exited.Sub(signalled).Round(time.Millisecond), samples)
					return
				}
				if !whole() {
					t.Errorf("after the old instance's --cleanup: %q", ourState(t, ns, backend))
				}
				gap := time.Duration(0)
				if !firstGap.IsZero() {
					gap = lastGap.Sub(firstGap)
				}
				// Both logs are stamped by the same clock: the new
				// instance's last repair against the start and the end of
				// the old one's cleanup.
				stopping := logTimes(t, old.log(), `"Stopping"`)
				removed := logTimes(t, old.log(), "Removed everything of ours")
				repaired := logTimes(t, cur.log(), "Repaired")
				if len(stopping) != 1 || len(removed) != 1 || len(repaired) == 0 || !repaired[len(repaired)-1].After(stopping[0]) {
					t.Fatalf("want the old instance's cleanup, then repairs by the new one; old:\n%s\nnew:\n%s", old.log(), cur.log())
				}
				last := repaired[len(repaired)-1]
				// What triggered the new instance's repairing syncs.
				var triggers []string
				for _, line := range strings.Split(cur.log(), "\n") {
					if strings.Contains(line, "Sync finished") && !strings.Contains(line, "repairs=0") {
						_, tr, _ := strings.Cut(line, "trigger=")
						tr, _, _ = strings.Cut(tr, " ")
						triggers = append(triggers, tr)
					}
				}
				t.Logf("%s: the old instance's --cleanup took %v; the new one's last repair came %v after the cleanup began (%v after it ended), in syncs triggered by %s; polled from the old one's exit, all was in place after %v; %d of %d samples saw something missing, over %v",
					backend, removed[0].Sub(stopping[0]).Round(time.Millisecond), last.Sub(stopping[0]).Round(time.Millisecond),
					last.Sub(removed[0]).Round(time.Millisecond), strings.Join(triggers, ", "), back.Round(time.Millisecond), incomplete, samples, gap.Round(time.Millisecond))
			})
		}
	}
}

// listingModes are the forms in which a shim of the listing program prints
// our chains (the lines of a chain whose name starts with
// render.ChainPrefix; the built-in chains are listed as they are). Each is
// a bash fragment that filters the real program's output from stdin to
// stdout.
var listingModes = []struct{ name, filter string }{
	{"options reordered", `sed -E '/^-A APISERVER-PROXY-/s/^(-A [^ ]+) (-[ds] [^ ]+) (-p tcp -m tcp --[ds]port [0-9]+)/\1 \3 \2/'`},
	{"extra spaces", `sed -E '/^-A APISERVER-PROXY-/s/ /  /g'`},
	{"a comment match", `sed -E '/^-A APISERVER-PROXY-/s/ -j / -m comment --comment "managed by someone" -j /'`},
	{"truncated lines", `sed -E '/^-A APISERVER-PROXY-/s/^(.{30}).*/\1/'`},
	{"binary garbage", `sed -E '/^(-[AN] |:)APISERVER-PROXY-/s/.*/\x00\xff\xfe\x01-A APISERVER\x00PROXY\xc3\x28 -j/'`},
	{"nothing for our chains", `sed -E '/^(-[AN] |:)APISERVER-PROXY-/d'`},
}

// quiet waits until d has finished no sync for a while. A daemon that
// keeps syncing on its own (its writes triggering the verifications that
// write again) fails it.
func quiet(t *testing.T, d *daemon, what string) {
	t.Helper()
	const quietFor = 500 * time.Millisecond
	last, changed := d.syncsDone(), time.Now()
	eventually(t, what+": no sync for "+quietFor.String()+" (the sidecar keeps syncing on its own)", func() bool {
		if n := d.syncsDone(); n != last {
			last, changed = n, time.Now()
		}
		return time.Since(changed) > quietFor
	})
}

// TestUnexpectedListings runs the daemon with a shim of the program it
// lists its chains with (iptables-nft -S, iptables-legacy-save) that prints
// our chains in forms it does not expect, and adds a rule to one of our
// chains meanwhile. The sidecar must take the odd listing for drift and
// rewrite our chain, or, where the output is no listing at all, refuse it
// with an error naming the program; it must never crash, never write more
// than twice a sync (the write and its read-back check), with nft never
// feed itself (its writes are events that trigger verifications), and
// once the real listing is back it converges and writes no more.
func TestUnexpectedListings(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "bash", "sed")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ipt := "iptables-" + backend
			sh := newShims(t)
			writes, _ := sh.countRuns(t, restoreProgs(backend)...)
			mode := filepath.Join(t.TempDir(), "mode")
			setMode := func(filter string) {
				t.Helper()
				if err := os.WriteFile(mode, []byte(filter+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			setMode("cat")
			lister := "iptables-nft"
			// nft: only events trigger a sync, so that a sidecar feeding
			// itself shows. legacy sends no events: short interval.
			interval := "1h"
			if backend == "legacy" {
				lister, interval = "iptables-legacy-save", "50ms"
			}
			// The real program's output goes through the filter the mode
			// file holds; its exit status is kept.
			listedLog, listed := runLog(t)
			sh.write(t, lister, fmt.Sprintf("echo %s >> %s\nset -o pipefail\nREAL \"$@\" | bash %s\n", lister, listedLog, mode))
			whole := wholeCheck(t, ns, backend)
			d := startDaemonEnv(t, ns, []string{sh.pathFirst()}, bin, "--ip-address", dualStack, "--setup-iptables",
				"--iptables-backend", backend, "--sync-interval", interval, "--unsafe-short-sync-interval", "-v", "2")
			eventually(t, "first sync", whole)
			// The writes and syncs counted below are the modes', none of
			// the start-up's.
			d.startupSynced(t)
			bumps := 0
			// trigger makes, with nft, a foreign change (an event) so that
			// the sidecar verifies; legacy verifies at every interval.
			trigger := func() {
				if backend == "nft" {
					bumps++
					ns.Run(t, ipt, "-t", "mangle", "-A", "PREROUTING", "-s", fmt.Sprintf("192.0.2.%d/32", bumps), "-j", "ACCEPT")
				}
			}
			for _, m := range listingModes {
				t.Run(m.name, func(t *testing.T) {
					w, s, l, logged := writes(), d.syncsDone(), listed(), len(d.log())
					setMode(m.filter)
					ns.Run(t, ipt, "-A", "APISERVER-PROXY-INPUT", "-s", "192.0.2.8/32", "-j", "DROP")
					outcome := ""
					eventually(t, "the extra rule removed, or the listing refused", func() bool {
						switch {
						case whole():
							outcome = "rewritten"
						case strings.Contains(d.logSince(logged), lister) && strings.Contains(d.logSince(logged), "not a listing"):
							outcome = "refused as no listing"
						}
						return outcome != ""
					})
					if backend == "nft" {
						quiet(t, d, "with the odd listing")
					} else {
						eventually(t, "10 syncs", func() bool { return d.syncsDone() >= s+10 })
					}
					wrote, synced, odd := writes()-w, d.syncsDone()-s, listed()-l
					if wrote > 2*synced {
						t.Errorf("%d writes in %d syncs with the odd listing, want at most two a sync", wrote, synced)
					}

					setMode("cat")
					back, logged := time.Now(), len(d.log())
					trigger()
					eventually(t, "converged with the real listing", whole, since(back))
					eventually(t, "a sync that finds nothing to repair", func() bool {
						if !strings.Contains(d.logSince(logged), "repairs=0 ok=true") {
							trigger()
							return false
						}
						return true
					})
					converged := time.Since(back)
					// Converged: foreign changes (events, with nft) or 20
					// syncs cause no write.
					w2 := writes()
					if backend == "nft" {
						for range 5 {
							trigger()
						}
						quiet(t, d, "with the real listing")
					} else {
						n := d.syncsDone()
						eventually(t, "20 syncs", func() bool { return d.syncsDone() >= n+20 })
					}
					if n := writes() - w2; n != 0 {
						t.Errorf("%d writes after the real listing came back and the sidecar converged, want 0", n)
					}
					if d.cmd.ProcessState != nil {
						t.Fatalf("the sidecar exited: %v", d.cmd.ProcessState)
					}
					if got, want := ourState(t, ns, backend), wantState(t, backend); !slices.Equal(got, want) {
						t.Errorf("our state is\n%q\nwant\n%q", got, want)
					}
					t.Logf("%s, listing %s: %s; %d syncs, %d odd listings, %d writes until quiet; converged %v after the real listing came back",
						backend, m.name, outcome, synced, odd, wrote, converged.Round(time.Millisecond))
				})
			}
		})
	}
}

// logTimes returns the times of the lines of log that contain what, as
// klog stamps them (I1126 01:28:13.350545 ...), on the day of the test.
func logTimes(t *testing.T, log, what string) []time.Time {
	t.Helper()
	var out []time.Time
	for _, line := range strings.Split(log, "\n") {
		f := strings.Fields(line)
		if !strings.Contains(line, what) || len(f) < 2 {
			continue
		}
		ts, err := time.ParseInLocation("15:04:05.000000", f[1], time.Local)
		if err != nil {
			t.Fatalf("no klog time in %q: %v", line, err)
		}
		out = append(out, ts)
	}
	return out
}

// TestHostileEnvironment changes the node under a running daemon the way
// other agents and operators do. Each change is repaired, or left alone
// where repairing it would harm someone else, and the log says which.
func TestHostileEnvironment(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "bash")

	t.Run("address on another link", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		ns.Run(t, "ip", "link", "add", "apsc-a", "type", "veth", "peer", "name", "apsc-b")
		ns.Run(t, "ip", "addr", "add", "192.0.2.50/24", "dev", "apsc-a")
		// An earlier configuration kept the address on apsc-a, with our mark.
		if out, err := ns.Command(bin, "--ip-address", "10.96.0.2", "--interface", "apsc-a", "--daemon=false").CombinedOutput(); err != nil {
			t.Fatalf("the earlier run: %v\n%s", err, out)
		}
		d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--sync-interval", "1h", "-v", "2")
		moved := func() bool {
			return hasAddr(t, ns, "lo", "10.96.0.2/32") && !hasAddr(t, ns, "apsc-a", "10.96.0.2/32")
		}
		eventually(t, "our address moves to lo", moved)
		// Someone else adds it there again while the daemon runs: theirs,
		// so it stays, and the log says so once.
		ns.Run(t, "ip", "addr", "add", "10.96.0.2/32", "dev", "apsc-a")
		const left = `"Address is also on a link another agent manages; leaving it there" address="10.96.0.2" link="apsc-a"`
		took := eventually(t, "the foreign copy is logged", func() bool { return strings.Contains(d.log(), left) })
		// Our own copy deleted: put back on lo, and the foreign one is
		// looked at again.
		ns.Run(t, "ip", "addr", "del", "10.96.0.2/32", "dev", "lo")
		eventually(t, "our address back on lo", func() bool {
			return strings.Count(d.log(), `repair="address added 10.96.0.2/32 on lo"`) >= 2 && hasAddr(t, ns, "lo", "10.96.0.2/32")
		})
		if !hasAddr(t, ns, "apsc-a", "10.96.0.2/32") || !hasAddr(t, ns, "apsc-a", "192.0.2.50/24") {
			t.Errorf("an address someone else put on apsc-a is gone:\n%s", ns.Run(t, "ip", "addr", "show", "dev", "apsc-a"))
		}
		if n := strings.Count(d.log(), left); n != 1 {
			t.Errorf("%d log lines about the foreign copy, want 1:\n%s", n, d.log())
		}
		if n := strings.Count(d.log(), `repair="address removed 10.96.0.2/32 on apsc-a"`); n != 1 {
			t.Errorf("%d log lines name a removal from apsc-a, want the one of our own copy:\n%s", n, d.log())
		}
		t.Logf("the foreign copy on another link is noticed %v after it appeared, and left there (events; 1h interval)", took.Round(time.Millisecond))
	})

	t.Run("interface missing", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		if ns.SupportsLinkKind(t, "dummy") {
			// Created, then deleted and set down by someone else: both
			// repaired, from link events.
			d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--interface", "apsc0", "--sync-interval", "1h", "-v", "2")
			ready := func() bool {
				_, err := ns.RunErr("ip", "link", "show", "apsc0")
				return err == nil && linkUp(t, ns, "apsc0") && hasAddr(t, ns, "apsc0", "10.96.0.2/32")
			}
			eventually(t, "the dummy link is created", ready)
			ns.Run(t, "ip", "link", "del", "apsc0")
			deleted := eventually(t, "the deleted dummy link is back", ready)
			ns.Run(t, "ip", "link", "set", "apsc0", "down")
			down := eventually(t, "the dummy link is up again", ready)
			for _, want := range []string{`repair="link created apsc0"`, `repair="link set up apsc0"`} {
				if !strings.Contains(d.log(), want) {
					t.Errorf("the log lacks %s:\n%s", want, d.log())
				}
			}
			t.Logf("dummy link deleted: back after %v; set down: up after %v", deleted.Round(time.Millisecond), down.Round(time.Millisecond))
			return
		}
		// Without dummy links (CONFIG_DUMMY), the link cannot be created:
		// every sync says why, the daemon keeps running and the rules are
		// kept in place all the same.
		d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--interface", "apsc0", "--setup-iptables",
			"--iptables-backend", "nft", "--sync-interval", "50ms", "--unsafe-short-sync-interval", "-v", "2")
		eventually(t, "three failed syncs", func() bool {
			return strings.Count(d.log(), "Sync failed; retrying") >= 3
		})
		if !strings.Contains(d.log(), "creating dummy link apsc0") {
			t.Errorf("the log does not say the dummy link could not be created:\n%s", d.log())
		}
		if out := ns.Run(t, "iptables-nft", "-t", "filter", "-S", "APISERVER-PROXY-INPUT"); !strings.Contains(out, "-d 10.96.0.2/32") {
			t.Errorf("rules not in place while the link cannot be created:\n%s", out)
		}
		if d.cmd.ProcessState != nil {
			t.Fatalf("the daemon exited: %v", d.cmd.ProcessState)
		}
		t.Logf("kernel without dummy links: %d failed syncs logged with the reason, the daemon keeps running and keeps the rules", strings.Count(d.log(), "Sync failed; retrying"))
	})

	t.Run("interface down and not ours", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		ns.Run(t, "ip", "link", "add", "apsc-a", "type", "veth", "peer", "name", "apsc-b")
		ns.Run(t, "ip", "link", "set", "apsc-a", "up")
		d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--interface", "apsc-a", "--sync-interval", "20ms", "--unsafe-short-sync-interval", "-v", "2")
		eventually(t, "the address is added", func() bool { return hasAddr(t, ns, "apsc-a", "10.96.0.2/32") })
		ns.Run(t, "ip", "link", "set", "apsc-a", "down")
		const warning = `"Link is down and was not created by this sidecar; leaving it down, its addresses will not be reachable" link="apsc-a"`
		eventually(t, "the warning", func() bool { return strings.Contains(d.log(), warning) })
		n := d.syncsDone()
		eventually(t, "20 more syncs", func() bool { return d.syncsDone() >= n+20 })
		if linkUp(t, ns, "apsc-a") {
			t.Error("a link the sidecar did not create was set up")
		}
		if c := strings.Count(d.log(), warning); c != 1 {
			t.Errorf("the warning was logged %d times in one down episode, want once", c)
		}
		if !hasAddr(t, ns, "apsc-a", "10.96.0.2/32") {
			t.Error("the address is gone from the link that is down")
		}
		t.Logf("a link the sidecar did not create, set down: left down, warned once over %d syncs", d.syncsDone()-n)
	})

	t.Run("lo set down", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		d := startDaemon(t, ns, bin, "--ip-address", dualStack, "--setup-iptables", "--iptables-backend", "nft",
			"--sync-interval", "1h", "-v", "2")
		whole := wholeCheck(t, ns, "nft")
		eventually(t, "first sync", whole)
		ns.Run(t, "ip", "link", "set", "lo", "down")
		took := eventually(t, "lo up with both addresses", func() bool { return linkUp(t, ns, "lo") && whole() })
		if !strings.Contains(d.log(), `repair="link set up lo"`) {
			t.Errorf("the log does not say lo was set up:\n%s", d.log())
		}
		t.Logf("lo set down: up again with both addresses after %v (events; 1h interval)", took.Round(time.Millisecond))
	})

	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ipt := "iptables-" + backend
			sh := newShims(t)
			writes, _ := sh.countRuns(t, restoreProgs(backend)...)
			d := startDaemonEnv(t, ns, []string{sh.pathFirst()}, bin, "--ip-address", dualStack, "--setup-iptables",
				"--iptables-backend", backend, "--sync-interval", "20ms", "--unsafe-short-sync-interval", "-v", "2")
			whole := wholeCheck(t, ns, backend)
			eventually(t, "first sync", whole)
			// settle waits for 20 syncs and returns the writes they made.
			settle := func() int {
				t.Helper()
				w, n := writes(), d.syncsDone()
				eventually(t, "20 syncs", func() bool { return d.syncsDone() >= n+20 })
				return writes() - w
			}
			settle()

			t.Run("foreign rule above our jump", func(t *testing.T) {
				w := writes()
				ns.Run(t, ipt, "-I", "INPUT", "-s", "192.0.2.7/32", "-j", "DROP")
				if n := settle(); n != 0 || writes() != w {
					t.Errorf("%d writes after a foreign rule was inserted above our jump, want none", writes()-w)
				}
				rules := strings.Split(strings.TrimSpace(ns.Run(t, ipt, "-S", "INPUT")), "\n")
				if len(rules) != 3 || rules[1] != "-A INPUT -s 192.0.2.7/32 -j DROP" || rules[2] != "-A INPUT -j APISERVER-PROXY-INPUT" {
					t.Errorf("INPUT is\n%s\nwant the foreign rule first, our jump second, untouched", strings.Join(rules, "\n"))
				}
				t.Logf("%s: a foreign rule above our jump: left alone, 0 writes over 20 syncs", backend)
			})

			t.Run("extra rule in our chain", func(t *testing.T) {
				logged := len(d.log())
				ns.Run(t, ipt, "-A", "APISERVER-PROXY-INPUT", "-s", "192.0.2.8/32", "-j", "DROP")
				took := eventually(t, "the extra rule removed", whole)
				eventually(t, "the repair logged", func() bool {
					return strings.Contains(d.logSince(logged), `chain="APISERVER-PROXY-INPUT" drift="rules differ (2 listed, 1 rendered)"`)
				})
				if n := settle(); n != 0 {
					t.Errorf("%d writes over 20 syncs after the repair, want 0", n)
				}
				t.Logf("%s: a rule added to our chain: rewritten after %v", backend, took.Round(time.Millisecond))
			})

			t.Run("our chain renamed", func(t *testing.T) {
				logged := len(d.log())
				ns.Run(t, ipt, "-E", "APISERVER-PROXY-INPUT", "APSC-RENAMED")
				took := eventually(t, "our chain and jump are back", whole)
				eventually(t, "the repair logged", func() bool {
					l := d.logSince(logged)
					return strings.Contains(l, `chain="APISERVER-PROXY-INPUT" drift="missing"`) &&
						strings.Contains(l, `chain="APISERVER-PROXY-INPUT" drift="missing from INPUT"`)
				})
				if n := settle(); n != 0 {
					t.Errorf("%d writes over 20 syncs after the repair, want 0", n)
				}
				// The renamed chain is someone else's now: left alone.
				if out := ns.Run(t, ipt, "-S", "INPUT"); !strings.Contains(out, "-A INPUT -j APSC-RENAMED") {
					t.Errorf("the jump to the renamed chain is gone:\n%s", out)
				}
				if out := ns.Run(t, ipt, "-S", "APSC-RENAMED"); !strings.Contains(out, "-d 10.96.0.2/32") {
					t.Errorf("the renamed chain changed:\n%s", out)
				}
				t.Logf("%s: our chain renamed: a new one and its jump in place after %v; the renamed one left alone", backend, took.Round(time.Millisecond))
			})

			t.Run("policy changed", func(t *testing.T) {
				ns.Run(t, ipt, "-P", "INPUT", "DROP")
				if n := settle(); n != 0 {
					t.Errorf("%d writes after the policy of INPUT changed, want none", n)
				}
				// A repair in filter must not reset it either.
				w := writes()
				ns.Run(t, ipt, "-F", "APISERVER-PROXY-INPUT")
				eventually(t, "the flushed chain repaired", whole)
				if writes() == w {
					t.Error("the flushed chain was repaired without a write")
				}
				if out := ns.Run(t, ipt, "-S", "INPUT"); !strings.HasPrefix(out, "-P INPUT DROP\n") {
					t.Errorf("the policy of INPUT is not the operator's DROP any more:\n%s", out)
				}
				ns.Run(t, ipt, "-P", "INPUT", "ACCEPT")
				t.Logf("%s: INPUT policy set to DROP: left as set, through a repair of the filter table; nothing logged about it", backend)
			})
		})
	}
}

// TestRepairsThatDoNotStickAreHeldBack runs the nft backend's daemon with
// a restore program that stores our ACCEPT rules with a comment they were
// not written with, so that they list differently from what was written:
// every repair is found undone at once. Each write is an nftables event
// that triggers the next verification, so without a brake the sidecar
// would rewrite at the speed of its debounce for as long as that lasts.
// It must notice, say so, and hold back verifications on events, longer
// each time, until it goes quiet; once the restore program is sound again
// it converges. (The legacy backend sends no events: there every write
// waits for the interval, see TestUnexpectedListings.)
func TestRepairsThatDoNotStickAreHeldBack(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-nft-restore", "ip6tables-nft", "bash", "sed")
	ns := netnstest.New(t)
	sh := newShims(t)
	logFile, writes := runLog(t)
	odd := filepath.Join(t.TempDir(), "odd")
	sh.write(t, "iptables-nft-restore", fmt.Sprintf(`echo iptables-nft-restore >> %s
if [ -e %s ]; then
  sed -E 's/ -j ACCEPT$/ -m comment --comment "stored differently" -j ACCEPT/' | REAL "$@"
  exit
fi
exec REAL "$@"
`, logFile, odd))
	whole := wholeCheck(t, ns, "nft")
	d := startDaemonEnv(t, ns, []string{sh.pathFirst()}, bin, "--ip-address", dualStack, "--setup-iptables",
		"--iptables-backend", "nft", "--sync-interval", "1h", "-v", "2")
	eventually(t, "first sync", whole)
	quiet(t, d, "after the first sync")

	w, s, logged := writes(), d.syncsDone(), len(d.log())
	if err := os.WriteFile(odd, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ns.Run(t, "iptables-nft", "-F", "APISERVER-PROXY-INPUT")
	const holding = "Syncs keep failing; holding back verifications on events"
	eventually(t, "the sidecar says its syncs keep failing", func() bool {
		return strings.Contains(d.logSince(logged), holding)
	})
	quiet(t, d, "with repairs that do not stick")
	wrote, synced := writes()-w, d.syncsDone()-s
	t.Logf("repairs undone at once (nft, 1h interval): %d syncs and %d writes until quiet", synced, wrote)

	if err := os.Remove(odd); err != nil {
		t.Fatal(err)
	}
	back, logged := time.Now(), len(d.log())
	ns.Run(t, "iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-s", "192.0.2.1/32", "-j", "ACCEPT")
	eventually(t, "converged with a sound restore program", whole, since(back))
	repaired := time.Since(back)
	eventually(t, "verifying on events at once again", func() bool {
		return strings.Contains(d.logSince(logged), "Repairs stick again; verifying on events at once")
	})
	settled := time.Since(back)
	// Back to normal: a drift is repaired from its event, at once.
	ns.Run(t, "iptables-nft", "-F", "APISERVER-PROXY-INPUT")
	again := eventually(t, "a flushed chain repaired from its event", whole)
	t.Logf("restore program sound again: rules in place after %v, holding back ended after %v; a later flush repaired after %v",
		repaired.Round(time.Millisecond), settled.Round(time.Millisecond), again.Round(time.Millisecond))
}
