package apply

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Backend is an iptables backend, or BackendAuto (see internal/backend).
type Backend = backend.Backend

// The iptables backends.
const (
	BackendNFT    = backend.NFT
	BackendLegacy = backend.Legacy
	// BackendAuto detects the backend the host uses (see Detect).
	BackendAuto = backend.Auto
)

// other returns the backend b is not.
func other(b Backend) Backend {
	if b == BackendNFT {
		return BackendLegacy
	}
	return BackendNFT
}

// tools returns the programs the sidecar runs with backend b: per-chain
// listings and restore with nft, save and restore with legacy.
func tools(b Backend) []backend.Tool {
	if b == BackendLegacy {
		return []backend.Tool{backend.Save, backend.Restore}
	}
	return []backend.Tool{backend.IPTables, backend.Restore}
}

// lookPath returns an error naming the first program of backend b for
// family f that is not in PATH.
func (r runner) lookPath(b Backend, f render.Family) error {
	for _, t := range tools(b) {
		name := program(b, f, t)
		if _, err := r.node.LookPath(name); err != nil {
			return fmt.Errorf("iptables backend %s needs %s, which is not in PATH: %w", b, name, err)
		}
	}
	return nil
}

// program returns the name of t for family f in backend b, such as
// "ip6tables-nft-restore" (made by backend.Binary).
func program(b Backend, f render.Family, t backend.Tool) string {
	return backend.Binary(b, f == render.IPv6, t)
}

// ToolError is a failed run of an iptables program. It carries the
// program's own stderr.
type ToolError struct {
	// Command is the program and its arguments.
	Command []string
	// ExitCode is the program's exit status, or -1 when it did not exit on
	// its own (not found, killed on timeout).
	ExitCode int
	Stderr   string
	Err      error
}

func (e *ToolError) Error() string {
	msg := strings.Join(e.Command, " ") + ": " + e.Err.Error()
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + strings.Join(strings.Fields(s), " ")
	}
	return msg
}

func (e *ToolError) Unwrap() error { return e.Err }

// IsLockHeld reports whether err is a write that gave up waiting for the
// xtables lock another process holds.
func IsLockHeld(err error) bool {
	var te *ToolError
	return errors.As(err, &te) && te.ExitCode == 4 && strings.Contains(te.Stderr, "xtables lock")
}

// isChainNotFound reports whether err is a listing of a chain that does not
// exist. iptables-legacy says "No chain/target/match by that name";
// iptables-nft 1.8.9 calls a missing chain "incompatible", later releases
// say it "does not exist".
func isChainNotFound(err error) bool {
	var te *ToolError
	if !errors.As(err, &te) || te.ExitCode != 1 {
		return false
	}
	for _, s := range []string{"No chain/target/match by that name", "does not exist", "is incompatible"} {
		if strings.Contains(te.Stderr, s) {
			return true
		}
	}
	return false
}

// runner runs iptables programs on a node, each bounded by a timeout so
// that a hung program is killed rather than stalling the sync loop, and
// reads the node's /proc and nfnetlink through the same node.
type runner struct {
	node    node
	timeout time.Duration
}

// defaultTimeout bounds each iptables program. Writes wait at most
// backend.LockWait for the xtables lock, reads take milliseconds; anything
// slower than this is hung.
const defaultTimeout = 30 * time.Second

// run runs name with args, stdin (may be nil) and hands every line of its
// stdout to line as it arrives, so that a long listing is never held in
// memory as a whole. An exit 0 whose output fails check is an error.
func (r runner) run(ctx context.Context, stdin []byte, check outputCheck, line func(string), name string, args ...string) error {
	return r.runKeep(ctx, stdin, check, nil, line, name, args...)
}

// runKeep is run where line wants only the lines keep (if not nil)
// accepts: the others are looked at as bytes and never copied, which keeps
// reading a legacy table of 50,000 rules cheap.
func (r runner) runKeep(ctx context.Context, stdin []byte, check outputCheck, keep func([]byte) bool, line func(string), name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	cmd := r.node.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.SetStdin(bytes.NewReader(stdin))
	}
	seen := check.start()
	lw := &lineWriter{fn: func(b []byte) {
		seen.see(b)
		if keep == nil || keep(b) {
			line(string(b))
		}
	}}
	var stderr bytes.Buffer
	out := &outputs{}
	cmd.SetStdout(out.writer(lw))
	cmd.SetStderr(out.writer(&stderr))
	done := make(chan error, 1)
	go func() { done <- cmd.Run() }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		// The program is killed; a process it started (a wrapper
		// script's child) may still hold its output open, and Run
		// waits for that to close.
		select {
		case err = <-done:
		case <-time.After(outputGrace):
			return &ToolError{Command: append([]string{name}, args...), ExitCode: -1, Stderr: out.abandon(&stderr),
				Err: fmt.Errorf("killed after %s, but a process it started still holds its output open: not waiting for it", r.timeout)}
		}
	}
	lw.flush()
	if err == nil {
		if msg := seen.lacking(); msg != "" {
			return &ToolError{Command: append([]string{name}, args...), ExitCode: 0, Stderr: stderr.String(), Err: errors.New(msg)}
		}
		return nil
	}
	te := &ToolError{Command: append([]string{name}, args...), ExitCode: -1, Stderr: stderr.String(), Err: err}
	var ee utilexec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		te.ExitCode = ee.ExitStatus()
	}
	if ctx.Err() != nil {
		te.Err = fmt.Errorf("%w (killed after %s)", err, r.timeout)
	}
	return te
}

// outputCheck says what the output of a program that exited 0 must hold
// to be believed. A listing always prints its header: `-S CHAIN` prints
// "-P CHAIN POLICY" (built-in chain) or "-N CHAIN", and `-save -t TABLE`
// prints "*TABLE" and "COMMIT". Output without them comes from a broken or
// substituted program; taken for an empty chain or table, it would make a
// sync rewrite what is in place and insert a duplicate jump at every sync.
type outputCheck struct {
	// chain is the chain of a `-S CHAIN` listing, table the table of a
	// `-save -t TABLE`; both empty: the output is not checked.
	chain, table string
}

// noCheck is the check of a program whose output is not a listing.
var noCheck = outputCheck{}

// chainListing is the check of `iptables -t TABLE -S chain`.
func chainListing(chain string) outputCheck { return outputCheck{chain: chain} }

// tableListing is the check of `iptables-save -t table`.
func tableListing(table string) outputCheck { return outputCheck{table: table} }

// listing follows one program's output for its check.
type listing struct {
	outputCheck
	// The header lines that mark a listing: "-N CHAIN" and the prefix
	// "-P CHAIN " for -S, "*TABLE" for -save.
	newChain, policy, star []byte
	header                 bool // the "-P", "-N" or "*TABLE" line was seen
	commit                 bool
	first                  string
	lines                  int
}

func (c outputCheck) start() *listing {
	l := &listing{outputCheck: c}
	if c.chain != "" {
		l.newChain, l.policy = []byte("-N "+c.chain), []byte("-P "+c.chain+" ")
	}
	if c.table != "" {
		l.star = []byte("*" + c.table)
	}
	return l
}

func (l *listing) see(line []byte) {
	if l.lines == 0 {
		l.first = string(line)
	}
	l.lines++
	switch {
	case l.chain != "" && (bytes.Equal(line, l.newChain) || bytes.HasPrefix(line, l.policy)):
		l.header = true
	case l.table != "" && bytes.Equal(line, l.star):
		l.header = true
	case l.table != "" && l.header && string(line) == "COMMIT":
		l.commit = true
	}
}

// lacking says what the output lacks to be a listing, or "" if nothing.
func (l *listing) lacking() string {
	var want string
	switch {
	case l.chain != "" && !l.header:
		want = fmt.Sprintf("no %q or %q line", "-N "+l.chain, "-P "+l.chain)
	case l.table != "" && (!l.header || !l.commit):
		want = fmt.Sprintf("no %q ... %q block", "*"+l.table, "COMMIT")
	default:
		return ""
	}
	if l.lines == 0 {
		return "exited 0 without output, " + want + ": not a listing"
	}
	return fmt.Sprintf("exited 0 with %s in %d lines of output (the first: %q): not a listing", want, l.lines, l.first)
}

// outputGrace bounds the wait for a killed program's output to close.
const outputGrace = 2 * time.Second

// outputs guards a program's stdout and stderr writers, so that once run
// stops waiting for the program, whatever it still writes is dropped
// rather than raced with.
type outputs struct {
	mu        sync.Mutex
	abandoned bool
}

func (o *outputs) writer(w io.Writer) io.Writer {
	return writerFunc(func(p []byte) (int, error) {
		o.mu.Lock()
		defer o.mu.Unlock()
		if o.abandoned {
			return len(p), nil
		}
		return w.Write(p)
	})
}

// abandon drops all later output and returns what stderr holds.
func (o *outputs) abandon(stderr *bytes.Buffer) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.abandoned = true
	return stderr.String()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// lineWriter calls fn for each complete line written to it. The slice is
// valid only during the call.
type lineWriter struct {
	fn  func([]byte)
	buf []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			break
		}
		if len(w.buf) > 0 {
			w.buf = append(w.buf, p[:i]...)
			w.fn(w.buf)
			w.buf = w.buf[:0]
		} else {
			w.fn(p[:i])
		}
		p = p[i+1:]
	}
	w.buf = append(w.buf, p...)
	return n, nil
}

func (w *lineWriter) flush() {
	if len(w.buf) > 0 {
		w.fn(w.buf)
		w.buf = w.buf[:0]
	}
}
