// Command apiserver-proxy-sidecar makes a local API-server proxy reachable on
// a Kubernetes node: it keeps the proxy's address on an interface and,
// optionally, iptables rules that accept the proxy's traffic and exempt it
// from connection tracking. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/apply"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/config"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/telemetry"
)

const name = "apiserver-proxy-sidecar"

// version is stamped at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // a one-shot run that failed
	exitUsage   = 2 // bad command line; nothing was changed
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr, machine{
		sidecar: startSidecar,
		detect: func(ctx context.Context, f render.Family) (apply.Detection, error) {
			return apply.DetectBackend(ctx, utilexec.New(), f)
		},
	}))
}

// machine is what run reaches the machine through; tests replace it.
type machine struct {
	// sidecar runs the sidecar with a validated configuration until ctx is
	// done (daemon) or after one sync (--daemon=false).
	sidecar func(ctx context.Context, cfg config.Config, rulesets []*render.Ruleset) error
	// detect finds the iptables backend the host uses; it only reads.
	detect func(ctx context.Context, f render.Family) (apply.Detection, error)
}

// run parses and validates args, then either prints the version
// (--version) or the ruleset (--dry-run), or hands over to the sidecar. It
// returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, m machine) int {
	var flags config.Flags
	fs := newFlagSet(&flags)
	showVersion := fs.Bool("version", false, "print the version and the Go release this binary was built with, and exit.")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage of %s:\n%s", name, fs.FlagUsages())
			return exitOK
		}
		return usageError(stderr, err)
	}
	if fs.NArg() > 0 {
		if flag, value, ok := boolValueApart(fs, args); ok {
			return usageError(stderr, fmt.Errorf("unexpected argument %q: --%s takes no separate value: write --%s=%s", value, flag, flag, value))
		}
		return usageError(stderr, fmt.Errorf("unexpected argument %q: this command takes flags only", fs.Arg(0)))
	}
	if err := refuseNewlines(fs); err != nil {
		return usageError(stderr, err)
	}
	if *showVersion {
		fmt.Fprintf(stdout, "%s %s %s %s/%s\n", name, version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return exitOK
	}
	cfg, err := flags.Validate()
	if err != nil {
		return usageError(stderr, err)
	}
	rulesets, err := render.Render(cfg.Addrs, cfg.Port)
	if err != nil {
		// Validation admits only what render accepts; this is a bug.
		fmt.Fprintf(stderr, "%s: render: %v\n", name, err)
		return exitFailure
	}
	if cfg.DryRun {
		out := append(backendComment(ctx, cfg, rulesets, m.detect), render.Format(rulesets)...)
		if _, err := stdout.Write(out); err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", name, err)
			return exitFailure
		}
		return exitOK
	}
	defer klog.Flush()
	if err := m.sidecar(ctx, cfg, rulesets); err != nil {
		klog.ErrorS(err, "Sidecar failed")
		return exitFailure
	}
	return exitOK
}

// dryRunDetectTimeout bounds the backend probe of --dry-run.
const dryRunDetectTimeout = 5 * time.Second

// backendComment says, as comment lines for the top of --dry-run's output,
// which iptables backend each family would use, and why. With
// --iptables-backend=auto it probes (reads only); where that is not
// possible, without root for one, it says so instead.
func backendComment(ctx context.Context, cfg config.Config, rulesets []*render.Ruleset, detect func(context.Context, render.Family) (apply.Detection, error)) []byte {
	var b strings.Builder
	for _, rs := range rulesets {
		if cfg.Backend != apply.BackendAuto {
			fmt.Fprintf(&b, "# %s iptables backend: %s (set with --iptables-backend)\n", rs.Family, cfg.Backend)
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, dryRunDetectTimeout)
		d, err := detect(dctx, rs.Family)
		cancel()
		if err != nil {
			msg := strings.Join(strings.Fields(err.Error()), " ")
			fmt.Fprintf(&b, "# %s iptables backend: detected at start; cannot tell now: %s\n", rs.Family, msg)
			continue
		}
		fmt.Fprintf(&b, "# %s iptables backend: %s (detected: %s)\n", rs.Family, d.Backend, d.Evidence)
	}
	return []byte(b.String())
}

// newFlagSet returns the command line: the sidecar's flags and klog's,
// bridged from the standard library's flag package.
func newFlagSet(flags *config.Flags) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard) // run reports errors and help itself
	flags.AddFlags(fs)
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	fs.AddGoFlagSet(klogFlags)
	return fs
}

// boolValueApart finds a boolean flag followed by a separate argument that
// reads as a boolean (--daemon false): pflag takes a boolean's value only
// after "=", so the "false" is left over as an argument. It walks args as
// pflag does, so that the value of a flag that takes one is not mistaken
// for a flag.
func boolValueApart(fs *pflag.FlagSet, args []string) (flag, value string, ok bool) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		var f *pflag.Flag
		switch {
		case a == "--":
			return "", "", false // the rest are arguments
		case strings.HasPrefix(a, "--") && !strings.Contains(a, "="):
			f = fs.Lookup(a[2:])
		case len(a) == 2 && a[0] == '-' && a[1] != '-':
			f = fs.ShorthandLookup(a[1:])
		}
		switch {
		case f == nil:
			// An argument, or a flag with its value attached.
		case f.NoOptDefVal == "":
			i++ // the next argument is this flag's value
		case i+1 < len(args):
			if _, err := strconv.ParseBool(args[i+1]); err == nil {
				return f.Name, args[i+1], true
			}
		}
	}
	return "", "", false
}

// refuseNewlines refuses any flag value with a line break: no value has a
// use for one, and it could forge lines in logs or in the rules.
func refuseNewlines(fs *pflag.FlagSet) error {
	var err error
	fs.Visit(func(f *pflag.Flag) {
		if v := f.Value.String(); err == nil && strings.ContainsAny(v, "\r\n") {
			err = &config.FlagError{Flag: f.Name, Value: v, Reason: "must not contain a line break"}
		}
	})
	return err
}

func usageError(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "%s: %v (see --help)\n", name, err)
	return exitUsage
}

// startSidecar runs the sidecar on this machine: in daemon mode until a
// signal, then cleanup if asked; with --daemon=false one sync, or with
// --cleanup only the cleanup (a teardown mode for preStop hooks and node
// clean-up jobs).
func startSidecar(ctx context.Context, cfg config.Config, rulesets []*render.Ruleset) error {
	// Handle the stop signals from the start: a signal during start-up
	// must not kill the process halfway. One-shot runs finish their work
	// regardless; the daemon stops its loop.
	ctx, stop := notifyStop(ctx)
	defer stop()
	if !cfg.Daemon {
		defer func() {
			if sig := receivedSignal(ctx); sig != "" {
				klog.InfoS("Signal received; the one-shot run finished its work first", "signal", sig)
			}
		}()
	}
	defer logResourceUse()
	address, err := apply.NewAddressManager(cfg.Interface, cfg.Addrs)
	if err != nil {
		return err
	}
	defer address.Close()
	var rules []*apply.Rules
	tel := telemetry.New(telemetry.Options{SyncInterval: cfg.SyncInterval, Version: version})
	// What the legacy tables' poller and the syncs last saw of them.
	legacySeen := &apply.LegacySeen{}
	if cfg.SetupIPTables {
		ex := utilexec.New()
		for _, rs := range rulesets {
			r := apply.NewRules(ex, cfg.Backend, rs, tel)
			r.SetTimeout(cfg.IPTablesTimeout)
			r.SetLegacySeen(legacySeen)
			rules = append(rules, r)
		}
	}
	sidecar := apply.NewSidecar(address, rules, tel)
	if cfg.SetupIPTables {
		retired, err := retiredRules(rulesets, tel, cfg.IPTablesTimeout)
		if err != nil {
			return err
		}
		sidecar.Retire(retired...)
		if cfg.Daemon {
			sidecar.CheckDNAT(apply.NewDNATCheck(cfg.Addrs, cfg.Port))
		}
	}
	klog.InfoS("Starting", "version", version, "addresses", cfg.Addrs, "port", cfg.Port, "interface", cfg.Interface,
		"setupIPTables", cfg.SetupIPTables, "iptablesBackend", cfg.Backend, "iptablesTimeout", cfg.IPTablesTimeout, "daemon", cfg.Daemon, "cleanup", cfg.Cleanup, "syncInterval", cfg.SyncInterval)

	switch {
	case !cfg.Daemon && cfg.Cleanup:
		return cleanup(sidecar, cfg.SetupIPTables)
	case !cfg.Daemon:
		if err := sidecar.Sync(context.WithoutCancel(ctx)); err != nil {
			return err
		}
		if cfg.SetupIPTables {
			klog.InfoS("Address and rules are in place", "addresses", cfg.Addrs)
		} else {
			klog.InfoS("Address is in place; rules not managed (no --setup-iptables)", "addresses", cfg.Addrs)
		}
		return nil
	}
	// The health and metrics listeners run in daemon mode only: a one-shot
	// run ends before a probe or a scrape could tell anything from them.
	listeners, err := serveTelemetry(tel, cfg)
	if err != nil {
		return err
	}
	// The kernel reports changes to our address and link, and to nftables
	// (the nft backend's rules), so drift is repaired in milliseconds; the
	// legacy backend has no such events, so its tables' info is polled
	// (microseconds a poll) unless the nft backend is configured.
	events := make(chan apply.Trigger, 1)
	watchers := apply.Watchers{Interface: cfg.Interface, Addrs: cfg.Addrs, NFTables: cfg.SetupIPTables,
		Legacy: cfg.SetupIPTables && cfg.Backend != apply.BackendNFT, LegacySeen: legacySeen}
	go watchers.Run(ctx, events)
	sidecar.Run(ctx, cfg.SyncInterval, events)
	if sig := receivedSignal(ctx); sig != "" {
		klog.InfoS("Stopping", "signal", sig)
	} else {
		klog.InfoS("Stopping", "reason", context.Cause(ctx))
	}
	stopTelemetry(listeners)
	if cfg.Cleanup {
		return cleanup(sidecar, cfg.SetupIPTables)
	}
	if cfg.SetupIPTables {
		klog.InfoS("Leaving address and rules in place (no --cleanup)")
	} else {
		klog.InfoS("Leaving the address in place (no --cleanup); rules not managed (no --setup-iptables)")
	}
	return nil
}

// retiredRules returns Rules for each address family that no ruleset is
// for: what an earlier configuration may have left there is ours to remove.
func retiredRules(rulesets []*render.Ruleset, o apply.Observer, timeout time.Duration) ([]*apply.Rules, error) {
	var out []*apply.Rules
	for _, f := range []render.Family{render.IPv4, render.IPv6} {
		if slices.ContainsFunc(rulesets, func(rs *render.Ruleset) bool { return rs.Family == f }) {
			continue
		}
		rs, err := render.Chains(f)
		if err != nil {
			return nil, err
		}
		// Removal only: the backend is never chosen for these.
		r := apply.NewRules(utilexec.New(), apply.BackendAuto, rs, o)
		r.SetTimeout(timeout)
		out = append(out, r)
	}
	return out, nil
}

// stopSignals stop the sidecar in order: the daemon lets a sync in progress
// finish, then cleans up with --cleanup; a one-shot run finishes its work.
// SIGHUP is one of them: a supervisor or a closed terminal that sends it
// must not end the daemon halfway, unlogged and without its cleanup.
// SIGQUIT is left to Go, which prints every goroutine's stack and exits 2:
// that dump is how a hung daemon is debugged.
var stopSignals = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP}

// signalReceived is the cause of a context that notifyStop ended.
type signalReceived struct{ sig os.Signal }

func (s signalReceived) Error() string { return signalName(s.sig) + " received" }

// notifyStop returns a context that the first of stopSignals cancels, with
// a signalReceived cause. Until stop is called, later signals are caught
// and dropped, so that a second SIGTERM cannot cut a cleanup short.
func notifyStop(parent context.Context) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancelCause(parent)
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, stopSignals...)
	go func() {
		select {
		case sig := <-ch:
			cancel(signalReceived{sig})
		case <-ctx.Done():
		}
	}()
	return ctx, func() {
		signal.Stop(ch)
		cancel(context.Canceled)
	}
}

// receivedSignal names the signal that ended ctx ("SIGHUP"), or returns ""
// if none did.
func receivedSignal(ctx context.Context) string {
	var s signalReceived
	if errors.As(context.Cause(ctx), &s) {
		return signalName(s.sig)
	}
	return ""
}

// signalName is the signal's C name, as kill(1) and the README spell it.
func signalName(sig os.Signal) string {
	if n, ok := sig.(syscall.Signal); ok {
		if name := unix.SignalName(n); name != "" {
			return name
		}
	}
	return sig.String()
}

// logResourceUse logs, at exit and at -v=2, the CPU time of the process
// and of the iptables programs it ran, and the process's peak memory: what
// a node pays for the sidecar. The peak is the kernel's high-water mark of
// this program's own memory (VmHWM). getrusage's figures would mislead:
// a process started with vfork (as Go and container runtimes start
// programs) counts its parent's memory up to exec, and each child ours.
func logResourceUse() {
	var self, children syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &self) != nil || syscall.Getrusage(syscall.RUSAGE_CHILDREN, &children) != nil {
		return
	}
	cpu := func(u syscall.Rusage) time.Duration {
		return time.Duration(u.Utime.Nano() + u.Stime.Nano())
	}
	klog.V(2).InfoS("Resource use", "cpu", cpu(self), "childrenCPU", cpu(children), "peakRSSBytes", peakRSS())
}

// peakRSS returns VmHWM from /proc/self/status in bytes, or -1.
func peakRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				return -1
			}
			return kb * 1024
		}
	}
	return -1
}

// serveTelemetry starts the listeners the flags ask for; an address that
// cannot be listened on is an error before anything else starts.
func serveTelemetry(tel *telemetry.Telemetry, cfg config.Config) (*telemetry.Listeners, error) {
	l, err := tel.Start(cfg.HealthProbeBindAddress, cfg.MetricsBindAddress)
	if err != nil {
		return nil, err
	}
	if a := l.HealthAddr(); a != nil {
		klog.InfoS("Serving health probes", "address", a.String(), "paths", []string{"/healthz", "/readyz"})
	}
	if a := l.MetricsAddr(); a != nil {
		klog.InfoS("Serving metrics", "address", a.String(), "path", "/metrics")
	}
	return l, nil
}

// telemetryShutdownTimeout bounds the shutdown of the listeners at exit,
// which comes before cleanup.
const telemetryShutdownTimeout = 5 * time.Second

func stopTelemetry(l *telemetry.Listeners) {
	ctx, cancel := context.WithTimeout(context.Background(), telemetryShutdownTimeout)
	defer cancel()
	if err := l.Shutdown(ctx); err != nil {
		klog.ErrorS(err, "Stopping the health and metrics listeners")
	}
}

// cleanupTimeout bounds the removal at exit, well inside a pod's default
// termination grace period.
const cleanupTimeout = 20 * time.Second

// cleanup removes everything of ours and logs each thing it removed, or
// that nothing of ours was there. Without --setup-iptables it leaves every
// rule alone, and says so.
func cleanup(sidecar *apply.Sidecar, setupIPTables bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	removed, err := sidecar.Cleanup(ctx)
	for _, r := range removed {
		klog.InfoS("Removed", "what", r)
	}
	if !setupIPTables {
		klog.InfoS("Left iptables rules alone (no --setup-iptables)")
	}
	if err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if len(removed) == 0 {
		klog.InfoS("Nothing of ours was there to remove")
		return nil
	}
	klog.InfoS("Removed everything of ours", "count", len(removed))
	return nil
}
