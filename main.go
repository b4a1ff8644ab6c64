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
	"strings"

	"github.com/spf13/pflag"
	"k8s.io/klog/v2"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/config"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

const name = "apiserver-proxy-sidecar"

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // a one-shot run that failed
	exitUsage   = 2 // bad command line; nothing was changed
)

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr, startSidecar))
}

// sidecarFunc runs the sidecar with a validated configuration until ctx is
// done (daemon) or after one sync (--daemon=false).
type sidecarFunc func(ctx context.Context, cfg config.Config, rulesets []*render.Ruleset) error

// run parses and validates args, then either prints the ruleset
// (--dry-run) or hands over to sidecar. It returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, sidecar sidecarFunc) int {
	var flags config.Flags
	fs := newFlagSet(&flags)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage of %s:\n%s", name, fs.FlagUsages())
			return exitOK
		}
		return usageError(stderr, err)
	}
	if fs.NArg() > 0 {
		return usageError(stderr, fmt.Errorf("unexpected argument %q: this command takes flags only", fs.Arg(0)))
	}
	if err := refuseNewlines(fs); err != nil {
		return usageError(stderr, err)
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
		if _, err := stdout.Write(render.Format(rulesets)); err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", name, err)
			return exitFailure
		}
		return exitOK
	}
	defer klog.Flush()
	if err := sidecar(ctx, cfg, rulesets); err != nil {
		klog.ErrorS(err, "Sidecar failed")
		return exitFailure
	}
	return exitOK
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

func startSidecar(ctx context.Context, cfg config.Config, rulesets []*render.Ruleset) error {
	return errors.New("applying the address and rules is not implemented yet; use --dry-run")
}
