package e2e

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// TestDaemonRepairsAndExits runs the sidecar binary as a daemon in a
// namespace: it puts everything in place, repairs drift at the next sync,
// leaves everything in place on SIGTERM without --cleanup and removes
// exactly its own with --cleanup, exiting 0 both times.
func TestDaemonRepairsAndExits(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			ipt := "iptables-" + backend
			args := []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend, "--sync-interval", "100ms", "--unsafe-short-sync-interval", "-v", "2"}
			want := wantState(t, backend)
			whole := func() bool { return slices.Equal(ourState(t, ns, backend), want) }

			// A foreign rule in a chain we jump from, to see it survive.
			ns.Run(t, ipt, "-A", "INPUT", "-s", "192.0.2.9", "-j", "DROP")

			d := startDaemon(t, ns, bin, args...)
			eventually(t, "first sync", whole)
			// The repairs counted below are the drifts', none of the start-up's.
			d.startupSynced(t)
			d.repairs(t, ns, whole,
				[]string{ipt, "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
				[]string{ipt, "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING"},
				[]string{"ip6tables-" + backend, "-t", "filter", "-I", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"},
				[]string{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"},
				[]string{"ip", "addr", "del", "fd00::2/128", "dev", "lo"},
			)
			if code := d.stop(t); code != 0 {
				t.Fatalf("exit code %d after SIGTERM, want 0", code)
			}
			if got := ourState(t, ns, backend); !slices.Equal(got, want) {
				t.Errorf("without --cleanup, SIGTERM changed our state:\n%q", got)
			}

			d = startDaemon(t, ns, bin, append(args, "--cleanup")...)
			eventually(t, "restarted sidecar logs its first sync", func() bool {
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
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	args := func(backend string) []string {
		return []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend}
	}
	for _, backend := range backends {
		for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGINT} {
			t.Run(backend+"/"+unix.SignalName(sig), func(t *testing.T) {
				t.Parallel()
				ns := netnstest.New(t)
				want := wantState(t, backend)
				stopping := fmt.Sprintf(`"Stopping" signal=%q`, unix.SignalName(sig))

				d := startDaemon(t, ns, bin, args(backend)...)
				eventually(t, "first sync", func() bool { return slices.Equal(ourState(t, ns, backend), want) })
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
				eventually(t, "the restarted sidecar logs its start", func() bool {
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
		eventually(t, "the address on lo", onLo)
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
		eventually(t, "first sync", func() bool { return slices.Equal(ourState(t, ns, "nft"), want) })
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
