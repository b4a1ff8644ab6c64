package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// daemon is the sidecar binary running in the background in a namespace.
type daemon struct {
	cmd *exec.Cmd
	// logFile receives the sidecar's stderr directly, with no pipe in
	// between: a line the sidecar has written is in it, so a test never
	// sees the log lag behind the process.
	logFile string
	done    chan error
}

// log returns everything the sidecar has logged so far.
func (d *daemon) log() string {
	b, err := os.ReadFile(d.logFile)
	if err != nil {
		panic(fmt.Sprintf("reading the sidecar's log: %v", err))
	}
	return string(b)
}

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

// stop sends SIGTERM and returns the exit code.
func (d *daemon) stop(t *testing.T) int {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the sidecar did not exit within 30s of SIGTERM")
	}
	return d.cmd.ProcessState.ExitCode()
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

// ourState lists, for each family, our chains, the jumps to them and our
// addresses on lo, in a form that does not depend on listing order.
func ourState(t *testing.T, ns *netnstest.NS, backend string) []string {
	t.Helper()
	var out []string
	for _, save := range []string{"iptables-" + backend + "-save", "ip6tables-" + backend + "-save"} {
		table := ""
		for _, line := range strings.Split(ns.Run(t, save), "\n") {
			if strings.HasPrefix(line, "*") {
				table = line
			}
			if strings.Contains(line, render.ChainPrefix) {
				out = append(out, save+" "+table+" "+strings.TrimSuffix(line, " [0:0]"))
			}
		}
	}
	for _, f := range strings.Fields(ns.Run(t, "ip", "-o", "addr", "show", "dev", "lo")) {
		if f == "10.96.0.2/32" || f == "fd00::2/128" {
			out = append(out, "lo "+f)
		}
	}
	slices.Sort(out)
	return out
}

// wantState is ourState on a node where the dual-stack ruleset is in place.
func wantState(t *testing.T, backend string) []string {
	t.Helper()
	rulesets, err := render.Render([]netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("fd00::2")}, 443)
	if err != nil {
		t.Fatal(err)
	}
	out := []string{"lo 10.96.0.2/32", "lo fd00::2/128"}
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

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond) // polling interval
	}
}

// TestDaemonRepairsAndExits runs the sidecar binary as a daemon in a
// namespace: it puts everything in place, repairs drift at the next sync,
// leaves everything in place on SIGTERM without --cleanup and removes
// exactly its own with --cleanup, exiting 0 both times.
func TestDaemonRepairsAndExits(t *testing.T) {
	netnstest.Require(t)
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	bin := buildSidecar(t)
	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ipt := "iptables-" + backend
			args := []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend, "--sync-interval", "100ms", "--unsafe-short-sync-interval"}
			want := wantState(t, backend)
			whole := func() bool { return slices.Equal(ourState(t, ns, backend), want) }

			// A foreign rule in a chain we jump from, to see it survive.
			ns.Run(t, ipt, "-A", "INPUT", "-s", "192.0.2.9", "-j", "DROP")

			d := startDaemon(t, ns, bin, args...)
			eventually(t, 10*time.Second, "first sync", whole)
			for _, drift := range [][]string{
				{ipt, "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
				{ipt, "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING"},
				{"ip6tables-" + backend, "-t", "filter", "-I", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"},
				{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"},
				{"ip", "addr", "del", "fd00::2/128", "dev", "lo"},
			} {
				repairs := strings.Count(d.log(), "Repaired")
				ns.Run(t, drift[0], drift[1:]...)
				// The daemon may repair before we look: its log says it did.
				eventually(t, 10*time.Second, strings.Join(drift, " ")+" repaired", func() bool {
					return strings.Count(d.log(), "Repaired") > repairs && whole()
				})
			}
			if code := d.stop(t); code != 0 {
				t.Fatalf("exit code %d after SIGTERM, want 0", code)
			}
			if got := ourState(t, ns, backend); !slices.Equal(got, want) {
				t.Errorf("without --cleanup, SIGTERM changed our state:\n%q", got)
			}

			d = startDaemon(t, ns, bin, append(args, "--cleanup")...)
			eventually(t, 10*time.Second, "restarted sidecar logs its first sync", func() bool {
				return strings.Contains(d.log(), "Starting")
			})
			if code := d.stop(t); code != 0 {
				t.Fatalf("exit code %d after SIGTERM with --cleanup, want 0", code)
			}
			if left := ourState(t, ns, backend); len(left) != 0 {
				t.Errorf("--cleanup left: %q", left)
			}
			if out := ns.Run(t, ipt, "-S", "INPUT"); !strings.Contains(out, "-A INPUT -s 192.0.2.9/32 -j DROP") {
				t.Errorf("the foreign rule is gone from INPUT:\n%s", out)
			}
			if out := ns.Run(t, "ip", "-o", "link", "show", "lo"); !strings.Contains(out, "UP") {
				t.Errorf("lo is not up after cleanup: %s", out)
			}
		})
	}
}

// TestDaemonStopSignals stops the sidecar binary with SIGHUP and SIGINT:
// each stops it as SIGTERM does (TestDaemonRepairsAndExits), logged by
// name, exit 0, everything left in place without --cleanup and all of ours
// removed with it; without --setup-iptables the log says the rules were
// not managed. SIGQUIT is Go's: a dump of every goroutine and exit 2, with
// everything left in place.
func TestDaemonStopSignals(t *testing.T) {
	netnstest.Require(t)
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	bin := buildSidecar(t)
	args := func(backend string) []string {
		return []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend}
	}
	for _, backend := range []string{"nft", "legacy"} {
		for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGINT} {
			t.Run(backend+"/"+unix.SignalName(sig), func(t *testing.T) {
				t.Parallel()
				ns := netnstest.New(t)
				want := wantState(t, backend)
				stopping := fmt.Sprintf(`"Stopping" signal=%q`, unix.SignalName(sig))

				d := startDaemon(t, ns, bin, args(backend)...)
				eventually(t, 10*time.Second, "first sync", func() bool { return slices.Equal(ourState(t, ns, backend), want) })
				if code := d.signal(t, sig); code != 0 {
					t.Fatalf("exit code %d after %s, want 0", code, unix.SignalName(sig))
				}
				if log := d.log(); !strings.Contains(log, stopping) || !strings.Contains(log, "Leaving address and rules in place") {
					t.Errorf("the log does not show %s, then the address and rules left in place", stopping)
				}
				if got := ourState(t, ns, backend); !slices.Equal(got, want) {
					t.Errorf("without --cleanup, %s changed our state:\n%q", unix.SignalName(sig), got)
				}

				d = startDaemon(t, ns, bin, append(args(backend), "--cleanup")...)
				eventually(t, 10*time.Second, "the restarted sidecar logs its start", func() bool {
					return strings.Contains(d.log(), "Starting")
				})
				// Twice: the second must not cut the cleanup short.
				if err := d.cmd.Process.Signal(sig); err != nil {
					t.Fatal(err)
				}
				if code := d.signal(t, sig); code != 0 {
					t.Fatalf("exit code %d after two %s with --cleanup, want 0", code, unix.SignalName(sig))
				}
				if !strings.Contains(d.log(), stopping) {
					t.Errorf("the log does not show %s", stopping)
				}
				if left := ourState(t, ns, backend); len(left) != 0 {
					t.Errorf("%s with --cleanup left: %q", unix.SignalName(sig), left)
				}
			})
		}
	}
	t.Run("no --setup-iptables/SIGHUP", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2")
		onLo := func() bool {
			return strings.Contains(ns.Run(t, "ip", "-o", "addr", "show", "dev", "lo"), " 10.96.0.2/32 ")
		}
		eventually(t, 10*time.Second, "the address on lo", onLo)
		if code := d.signal(t, syscall.SIGHUP); code != 0 {
			t.Fatalf("exit code %d after SIGHUP, want 0", code)
		}
		if want := `"Leaving the address in place (no --cleanup); rules not managed (no --setup-iptables)"`; !strings.Contains(d.log(), want) {
			t.Errorf("the log does not say %s", want)
		}
		if !onLo() {
			t.Error("the address is gone from lo")
		}
	})
	t.Run("nft/SIGQUIT", func(t *testing.T) {
		t.Parallel()
		ns := netnstest.New(t)
		want := wantState(t, "nft")
		d := startDaemon(t, ns, bin, append(args("nft"), "--cleanup")...)
		eventually(t, 10*time.Second, "first sync", func() bool { return slices.Equal(ourState(t, ns, "nft"), want) })
		if code := d.signal(t, syscall.SIGQUIT); code != 2 {
			t.Errorf("exit code %d after SIGQUIT, want Go's 2", code)
		}
		if log := d.log(); !strings.Contains(log, "SIGQUIT: quit") || !strings.Contains(log, "goroutine ") {
			t.Error("no goroutine dump after SIGQUIT")
		}
		if got := ourState(t, ns, "nft"); !slices.Equal(got, want) {
			t.Errorf("SIGQUIT changed our state, even with --cleanup:\n%q", got)
		}
	})
}

func mustIPNet(t *testing.T, cidr string) *net.IPNet {
	t.Helper()
	ip, n, err := net.ParseCIDR(cidr)
	if err != nil {
		t.Fatal(err)
	}
	n.IP = ip
	return n
}
