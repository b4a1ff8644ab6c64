// Command availability measures what clients of the proxy feel while the
// node is disrupted: connections attempted, failed, and the longest gap
// between two successful connections, per client path, through the
// sidecar's own lifecycle (SIGKILL and restart, rolling updates with and
// without --cleanup), external flushes and deletions of what it keeps in
// place, and a kube-proxy-shaped writer storm, on both iptables backends.
//
// Run it through `make availability` (root: it creates network
// namespaces). It never changes the host's network namespace, and deletes
// every namespace it created at the end, on error and on SIGINT or
// SIGTERM. It exits 1 when a connection failed through a lifecycle event
// (kill, restart, update without --cleanup): the one target it asserts;
// the others it reports.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
)

const notRootMsg = "make availability needs root: it creates network namespaces (run: sudo make availability)"

// plan is how much of everything a run does.
type plan struct {
	Short    bool
	Only     string // run only the scenarios whose name contains it
	Backends []string
	Kills    int
	Updates  int
	Faults   int           // repetitions of each external fault
	Storm    time.Duration // the writer storm's length
	Interval time.Duration // between two attempts' starts, per path
	Timeout  time.Duration // of one attempt: connect, echo, close
	Bound    time.Duration // of the whole run
}

func newPlan(short bool) plan {
	p := plan{
		Backends: []string{"nft", "legacy"},
		Kills:    20, Updates: 10, Faults: 5, Storm: 30 * time.Second,
		Interval: 5 * time.Millisecond, Timeout: 300 * time.Millisecond,
		Bound: 15 * time.Minute,
	}
	if short {
		p.Short = true
		p.Kills, p.Updates, p.Faults, p.Storm = 5, 3, 2, 6*time.Second
		p.Bound = 4 * time.Minute
	}
	return p
}

func main() {
	os.Exit(availabilityMain(os.Args[1:]))
}

func availabilityMain(args []string) int {
	fs := flag.NewFlagSet("availability", flag.ContinueOnError)
	bin := fs.String("bin", "./apiserver-proxy-sidecar", "the sidecar binary (make build)")
	out := fs.String("out", "AVAILABILITY.md", "where to write the report")
	short := fs.Bool("short", false, "fewer repetitions and a 6 s storm (about 1 minute instead of 3)")
	only := fs.String("only", "", "run only the scenarios whose name contains this (to look into one)")
	backends := fs.String("backends", "nft,legacy", "the iptables backends to run on, comma-separated")
	stormLen := fs.Duration("storm", 0, "the writer storm's length (default 30s, 6s with -short)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "availability: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, notRootMsg)
		return 2
	}
	var missing []string
	programs := []string{"ip", "nft"}
	for _, b := range []backend.Backend{backend.NFT, backend.Legacy} {
		for _, t := range []backend.Tool{backend.IPTables, backend.Save, backend.Restore} {
			programs = append(programs, backend.Binary(b, false, t))
		}
	}
	for _, name := range programs {
		if _, err := exec.LookPath(name); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(os.Stderr, "availability: missing from PATH: %s (apt-get install -y iptables nftables iproute2)\n", strings.Join(missing, ", "))
		return 2
	}
	binPath, err := filepath.Abs(*bin)
	if err == nil {
		_, err = os.Stat(binPath)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "availability: -bin: the sidecar binary: %v (run: make build)\n", err)
		return 2
	}

	p := newPlan(*short)
	p.Only = *only
	if *stormLen < 0 || (*stormLen > 0 && *stormLen < time.Second) {
		fmt.Fprintf(os.Stderr, "availability: -storm: %s is not 1s or more\n", *stormLen)
		return 2
	}
	if *stormLen > p.Storm {
		// Each backend runs the storm once.
		p.Bound += 2 * (*stormLen - p.Storm)
	}
	if *stormLen > 0 {
		p.Storm = *stormLen
	}
	p.Backends = nil
	for _, b := range strings.Split(*backends, ",") {
		if b != "nft" && b != "legacy" {
			fmt.Fprintf(os.Stderr, "availability: -backends: %q is not nft or legacy\n", b)
			return 2
		}
		p.Backends = append(p.Backends, b)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, p.Bound)
	defer cancel()

	// A private xtables lock for everything started here: the machine's
	// /run/xtables.lock may be held by anyone.
	env, removeLock := nsrun.PrivateXtablesLock("apavail")
	defer removeLock()
	h := newHarness(env)

	rep, runErr := run(ctx, h, binPath, p)
	if code, ok := nsrun.Outcome(ctx, "availability", p.Bound, runErr, h.Cleanup()); !ok {
		return code
	}
	doc := rep.markdown()
	if err := os.WriteFile(*out, []byte(doc), 0o644); err != nil {
		fmt.Fprintf(os.Stderr, "availability: %v\n", err)
		return 1
	}
	fmt.Print(rep.table())
	fmt.Fprintf(os.Stderr, "availability: wrote %s\n", *out)
	if missed := rep.lifecycleMissed(); len(missed) > 0 {
		fmt.Fprintf(os.Stderr, "availability: connections failed through sidecar lifecycle events: %s\n", strings.Join(missed, "; "))
		return 1
	}
	return 0
}

// run measures every scenario on every backend, one at a time.
func run(ctx context.Context, h *harness, bin string, p plan) (*report, error) {
	started := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%5.1fs] "+format+"\n", append([]any{time.Since(started).Seconds()}, args...)...)
	}
	rep := &report{Plan: p, Started: started, LoadStart: loadAvg(), Machine: machine(ctx, bin)}
	for _, bk := range p.Backends {
		logf("%s: building the node", bk)
		n, err := h.newNode(ctx, p, bin, bk, logf)
		if err != nil {
			if n != nil {
				n.close()
			}
			return nil, fmt.Errorf("%s: %w", bk, err)
		}
		for _, sc := range scenarios(p) {
			if !strings.Contains(sc.Name, p.Only) {
				continue
			}
			logf("%s: %s (%d)", bk, sc.Name, sc.Events)
			if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
				n.close()
				return nil, fmt.Errorf("%s, before %s: %w", bk, sc.Name, err)
			}
			n.clients.begin()
			repairs0, errors0 := h.logCounts()
			changes0 := n.changes.Load()
			t0 := time.Now()
			detail, err := sc.run(ctx, n, sc.Events)
			if err == nil {
				// The window ends once every path works again, so that an
				// outage the last event caused is measured whole.
				err = n.clients.waitHealthy(ctx, t0, recoverTimeout)
			}
			stats := n.clients.end()
			if err != nil {
				n.close()
				return nil, fmt.Errorf("%s, %s: %w", bk, sc.Name, err)
			}
			repairs1, errors1 := h.logCounts()
			if sc.Kind == storm {
				detail += duringWrites(stats, n.writes)
			}
			r := result{Backend: bk, Scenario: sc, Detail: detail, Elapsed: time.Since(t0), PathNames: n.pathNames(), Paths: stats,
				Repairs: repairs1 - repairs0, Errors: errors1 - errors0, Changes: -1}
			if bk == "nft" {
				// Rules and addresses both watched.
				r.Changes = int(n.changes.Load() - changes0)
			}
			logf("%s: %s: %s", bk, sc.Name, r.summary())
			for _, line := range r.failureLines(t0, maxFailureLines) {
				logf("  %s", line)
			}
			rep.Results = append(rep.Results, r)
		}
		n.close()
	}
	rep.LoadEnd = loadAvg()
	rep.Elapsed = time.Since(started)
	return rep, nil
}
