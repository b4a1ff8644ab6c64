package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/apply"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/config"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// noMachine fails the test if the command got as far as starting the
// sidecar; its backend probe answers with a fixed detection.
func noMachine(t *testing.T) machine {
	return machine{
		sidecar: func(context.Context, config.Config, []*render.Ruleset) error {
			t.Error("the sidecar was started; bad input and --dry-run must change nothing")
			return nil
		},
		detect: func(_ context.Context, f render.Family) (apply.Detection, error) {
			if f == render.IPv6 {
				return apply.Detection{}, errors.New("iptables v1.8.9 (nf_tables): Could not fetch rule set generation id:\nPermission denied (you must be root)")
			}
			return apply.Detection{Backend: apply.BackendLegacy, Evidence: "chain KUBE-IPTABLES-HINT in mangle, seen with iptables-legacy-save"}, nil
		},
	}
}

func runCmd(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut, noMachine(t))
	return code, out.String(), errOut.String()
}

func TestBadInputExits2(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string // must appear in the message: the flag and the value
	}{
		{"missing address", nil, `"" for --ip-address`},
		{"address does not parse", []string{"--ip-address", "10.96.0.300"}, `"10.96.0.300" for --ip-address`},
		{"zone", []string{"--ip-address", "fe80::1%eth0"}, `"fe80::1%eth0" for --ip-address`},
		{"prefix", []string{"--ip-address", "10.96.0.2/32"}, `"10.96.0.2/32" for --ip-address`},
		{"unspecified IPv4", []string{"--ip-address", "0.0.0.0"}, `"0.0.0.0" for --ip-address`},
		{"unspecified IPv6", []string{"--ip-address", "::"}, `"::" for --ip-address`},
		{"an address twice", []string{"--ip-address", "10.96.0.2,100.64.0.1,10.96.0.2"}, `"10.96.0.2,100.64.0.1,10.96.0.2" for --ip-address`},
		{"nine addresses", []string{"--ip-address", "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,fd00::2"}, `"10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,fd00::2" for --ip-address`},
		{"port not a number", []string{"--ip-address", "10.96.0.2", "--port", "https"}, `"https" for --port`},
		{"port 0", []string{"--ip-address", "10.96.0.2", "--port", "0"}, `"0" for --port`},
		{"port 65536", []string{"--ip-address", "10.96.0.2", "--port", "65536"}, `"65536" for --port`},
		{"empty interface", []string{"--ip-address", "10.96.0.2", "--interface", ""}, `"" for --interface`},
		{"long interface", []string{"--ip-address", "10.96.0.2", "--interface", "abcdefghijklmnop"}, `"abcdefghijklmnop" for --interface`},
		{"interface with slash", []string{"--ip-address", "10.96.0.2", "--interface", "a/b"}, `"a/b" for --interface`},
		{"interface with space", []string{"--ip-address", "10.96.0.2", "--interface", "a b"}, `"a b" for --interface`},
		{"interface with colon", []string{"--ip-address", "10.96.0.2", "--interface", "lo:0"}, `"lo:0" for --interface`},
		{"interface with control character", []string{"--ip-address", "10.96.0.2", "--interface", "lo\x7f"}, `"lo\x7f" for --interface`},
		{"zero sync interval", []string{"--ip-address", "10.96.0.2", "--sync-interval", "0"}, `"0s" for --sync-interval`},
		{"negative sync interval", []string{"--ip-address", "10.96.0.2", "--sync-interval", "-5s"}, `"-5s" for --sync-interval`},
		{"sync interval of a millisecond", []string{"--ip-address", "10.96.0.2", "--sync-interval", "1ms"}, `invalid value "1ms" for --sync-interval: must be at least 1s`},
		{"sync interval below the floor", []string{"--ip-address", "10.96.0.2", "--sync-interval", "999ms"}, `invalid value "999ms" for --sync-interval: must be at least 1s`},
		{"zero sync interval, floor lifted", []string{"--ip-address", "10.96.0.2", "--sync-interval", "0", "--unsafe-short-sync-interval"}, `"0s" for --sync-interval`},
		{"sync interval not a duration", []string{"--ip-address", "10.96.0.2", "--sync-interval", "often"}, `"often" for "--sync-interval"`},
		{"iptables timeout within the lock wait", []string{"--ip-address", "10.96.0.2", "--iptables-timeout", "2s"}, `"2s" for --iptables-timeout`},
		{"newline in address", []string{"--ip-address", "10.96.0.2\n-A INPUT -j DROP"}, `--ip-address`},
		{"newline in port", []string{"--ip-address", "10.96.0.2", "--port", "443\n"}, `--port`},
		{"newline in interface", []string{"--ip-address", "10.96.0.2", "--interface", "lo\n"}, `--interface`},
		{"newline in a klog flag", []string{"--ip-address", "10.96.0.2", "--log_file", "a\nb"}, `"a\nb" for --log_file`},
		{"health address without port", []string{"--ip-address", "10.96.0.2", "--health-probe-bind-address", "127.0.0.1"}, `"127.0.0.1" for --health-probe-bind-address`},
		{"health port 0", []string{"--ip-address", "10.96.0.2", "--health-probe-bind-address", ":0"}, `":0" for --health-probe-bind-address`},
		{"health hostname", []string{"--ip-address", "10.96.0.2", "--health-probe-bind-address", "node1:16911"}, `"node1:16911" for --health-probe-bind-address`},
		{"metrics port too large", []string{"--ip-address", "10.96.0.2", "--metrics-bind-address", ":70000"}, `":70000" for --metrics-bind-address`},
		{"metrics port name", []string{"--ip-address", "10.96.0.2", "--metrics-bind-address", ":metrics"}, `":metrics" for --metrics-bind-address`},
		{"metrics on the health port", []string{"--ip-address", "10.96.0.2", "--health-probe-bind-address", "127.0.0.1:16911", "--metrics-bind-address", ":16911"}, `":16911" for --metrics-bind-address`},
		{"stray argument", []string{"--ip-address", "10.96.0.2", "extra"}, `unexpected argument "extra"`},
		{"unknown flag", []string{"--ip-address", "10.96.0.2", "--no-such-flag"}, `--no-such-flag`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// With --dry-run too: validation comes before everything.
			for _, args := range [][]string{tc.args, append([]string{"--dry-run"}, tc.args...)} {
				code, stdout, stderr := runCmd(t, args...)
				if code != exitUsage {
					t.Errorf("%q: exit code %d, want %d", args, code, exitUsage)
				}
				if stdout != "" {
					t.Errorf("%q: stdout %q, want nothing", args, stdout)
				}
				if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, tc.want) {
					t.Errorf("%q: stderr %q, want one line containing %s", args, stderr, tc.want)
				}
			}
		})
	}
}

// TestBoolFlagValueApart proves the hint for a boolean flag given its value
// as a separate argument (--daemon false), for every boolean flag of ours
// and every spelling pflag accepts, and that arguments are not mistaken
// for it.
func TestBoolFlagValueApart(t *testing.T) {
	for _, flag := range []string{"daemon", "cleanup", "setup-iptables", "dry-run"} {
		for _, value := range []string{"false", "true", "FALSE", "True", "f", "T", "0", "1"} {
			args := []string{"--ip-address", "10.96.0.2", "--" + flag, value}
			code, stdout, stderr := runCmd(t, args...)
			want := fmt.Sprintf(`unexpected argument %q: --%s takes no separate value: write --%s=%s (see --help)`+"\n", value, flag, flag, value)
			if code != exitUsage || stdout != "" || stderr != name+": "+want {
				t.Errorf("%q: exit code %d, stdout %q, stderr %q; want %d, nothing and %q", args, code, stdout, stderr, exitUsage, want)
			}
		}
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"value attached, then an argument", []string{"--ip-address", "10.96.0.2", "--daemon=false", "false"}},
		{"a flag's value that looks like a flag", []string{"--port", "--daemon", "false"}},
		{"not a boolean", []string{"--ip-address", "10.96.0.2", "--daemon", "no"}},
		{"after --", []string{"--ip-address", "10.96.0.2", "--", "--daemon", "false"}},
	} {
		code, _, stderr := runCmd(t, tc.args...)
		if code != exitUsage || strings.Contains(stderr, "takes no separate value") || !strings.Contains(stderr, "unexpected argument") {
			t.Errorf("%s: %q: exit code %d, stderr %q; want %d and no hint", tc.name, tc.args, code, stderr, exitUsage)
		}
	}
	// A shorthand that takes a value (-v 2) is skipped with it.
	code, _, stderr := runCmd(t, "-v", "2", "--ip-address", "10.96.0.2", "--dry-run", "false")
	if code != exitUsage || !strings.Contains(stderr, "--dry-run takes no separate value: write --dry-run=false") {
		t.Errorf("after -v 2: exit code %d, stderr %q; want the hint for --dry-run", code, stderr)
	}
}

// TestShortSyncIntervalNeedsUnsafeFlag proves that an interval below the
// floor is accepted only with the hidden flag that names itself unsafe.
func TestShortSyncIntervalNeedsUnsafeFlag(t *testing.T) {
	args := []string{"--dry-run", "--iptables-backend", "nft", "--ip-address", "10.96.0.2", "--sync-interval", "20ms"}
	if code, _, _ := runCmd(t, args...); code != exitUsage {
		t.Errorf("%q: exit code %d, want %d", args, code, exitUsage)
	}
	args = append(args, "--unsafe-short-sync-interval")
	if code, _, stderr := runCmd(t, args...); code != exitOK || stderr != "" {
		t.Errorf("%q: exit code %d, stderr %q; want 0 and nothing", args, code, stderr)
	}
	if _, stdout, _ := runCmd(t, "--help"); strings.Contains(stdout, "unsafe") {
		t.Errorf("--help shows the unsafe flag:\n%s", stdout)
	}
}

// TestStopSignals sends this process each stop signal: the context ends,
// naming the signal, and the process lives on.
func TestStopSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			ctx, stop := notifyStop(context.Background())
			defer stop()
			if got := receivedSignal(ctx); got != "" {
				t.Fatalf("before any signal: %q", got)
			}
			if err := syscall.Kill(os.Getpid(), sig); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(10 * time.Second):
				t.Fatalf("%v did not end the context within 10s", sig)
			}
			if got, want := receivedSignal(ctx), unix.SignalName(sig); got != want {
				t.Errorf("receivedSignal = %q, want %q", got, want)
			}
		})
	}
}

// TestStopWithoutSignal proves that a context ended otherwise names no
// signal.
func TestStopWithoutSignal(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	ctx, stop := notifyStop(parent)
	defer stop()
	cancel()
	<-ctx.Done()
	if got := receivedSignal(ctx); got != "" {
		t.Errorf("receivedSignal = %q after the parent was cancelled, want none", got)
	}
}

// TestVersion proves that --version prints the version and the Go release,
// with or without other flags, and starts nothing.
func TestVersion(t *testing.T) {
	want := fmt.Sprintf("%s %s %s %s/%s\n", name, version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	for _, args := range [][]string{{"--version"}, {"--version", "--ip-address", "10.96.0.2", "--setup-iptables"}, {"--version=true"}} {
		code, stdout, stderr := runCmd(t, args...)
		if code != exitOK || stdout != want || stderr != "" {
			t.Errorf("%q: exit code %d, stdout %q, stderr %q; want 0, %q and nothing", args, code, stdout, stderr, want)
		}
	}
	if code, _, _ := runCmd(t, "--version", "extra"); code != exitUsage {
		t.Errorf("--version with a stray argument: exit code %d, want %d", code, exitUsage)
	}
}

// TestVersionStampedByMakeBuild builds the binary as `make build` does and
// checks that --version reports the version the build was given: the
// variable the Makefile and the Dockerfile stamp (-X main.version) exists.
func TestVersionStampedByMakeBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping: builds the binary with make build (-short runs only the fast tests)")
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed")
	}
	for _, file := range []string{"Makefile", "Dockerfile"} {
		if !strings.Contains(readFile(t, file), "-X main.version=") {
			t.Errorf("%s does not stamp main.version", file)
		}
	}
	bin := filepath.Join(t.TempDir(), name)
	build := exec.Command("make", "--no-print-directory", "build", "BINARY="+bin, "VERSION=v0.0.0-stamp-test")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(out), name+" v0.0.0-stamp-test go") {
		t.Errorf("--version printed %q, want the stamped version", out)
	}
}

func TestHelpListsSeedFlags(t *testing.T) {
	code, stdout, stderr := runCmd(t, "--help")
	if code != exitOK || stderr != "" {
		t.Fatalf("exit code %d, stderr %q; want 0 and nothing", code, stderr)
	}
	// Each flag of the original sidecar, with its default where it has one.
	for _, want := range []string{
		"--add_dir_header ",
		"--alsologtostderr ",
		"--cleanup ",
		"--daemon ", "(default true)",
		`--interface string `, `(default "lo")`,
		"--ip-address string ",
		"--log_backtrace_at traceLocation ", "(default :0)",
		"--log_dir string ",
		"--log_file string ",
		"--log_file_max_size uint ", "(default 1800)",
		"--logtostderr ",
		`--port string `, `(default "443")`,
		"--setup-iptables ",
		"--skip_headers ",
		"--skip_log_headers ",
		"--stderrthreshold severity ", "(default 2)",
		"--sync-interval duration ", "(default 1m0s)",
		"-v, --v Level ",
		"--vmodule moduleSpec ",
		"--dry-run ",
		"--health-probe-bind-address string ",
		"--metrics-bind-address string ",
		"--version ",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("--help does not show %q", want)
		}
	}
}

// TestDryRunPrintsGolden proves that --dry-run prints exactly the golden
// rulesets, whether or not --setup-iptables is given, after one comment line
// per family naming the backend.
func TestDryRunPrintsGolden(t *testing.T) {
	const (
		forcedNFT = "# IPv4 iptables backend: nft (set with --iptables-backend)\n"
		detected  = "# IPv4 iptables backend: legacy (detected: chain KUBE-IPTABLES-HINT in mangle, seen with iptables-legacy-save)\n"
		unknown6  = "# IPv6 iptables backend: detected at start; cannot tell now: iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n"
	)
	for _, tc := range []struct {
		golden  string
		args    []string
		comment string
	}{
		{"ipv4-default.rules", []string{"--ip-address", "10.96.0.2"}, detected},
		{"ipv4-default.rules", []string{"--ip-address", "10.96.0.2", "--setup-iptables", "--iptables-backend", "nft"}, forcedNFT},
		{"ipv4-port-8443.rules", []string{"--ip-address", "10.96.0.2", "--port", "8443"}, detected},
		{"ipv6.rules", []string{"--ip-address", "fd00::2"}, unknown6},
		{"dual-stack.rules", []string{"--ip-address", "fd00::2,10.96.0.2"}, detected + unknown6},
	} {
		want, err := os.ReadFile(filepath.Join("golden", tc.golden))
		if err != nil {
			t.Fatal(err)
		}
		code, stdout, stderr := runCmd(t, append([]string{"--dry-run"}, tc.args...)...)
		if code != exitOK || stderr != "" {
			t.Errorf("%q: exit code %d, stderr %q", tc.args, code, stderr)
		}
		if diff := cmp.Diff(tc.comment+string(want), stdout); diff != "" {
			t.Errorf("%q (-want +got):\n%s", tc.args, diff)
		}
	}
}
