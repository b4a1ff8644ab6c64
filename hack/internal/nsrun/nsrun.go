// Package nsrun is the plumbing the measuring harnesses (hack/bench,
// hack/availability) share: network namespaces they create, programs they
// start inside them, and the removal of all of it on any exit.
package nsrun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nsthread"
)

// Harness owns every namespace and every process it creates, so that it
// can remove them all on any exit.
type Harness struct {
	prefix string   // of the namespaces' names: PREFIX-<pid>-<n>
	env    []string // environment of every program started in a namespace

	mu    sync.Mutex
	seq   int
	names []string
	procs map[*exec.Cmd]bool
}

// New returns a Harness whose namespaces are named prefix-<pid>-<n> and
// whose programs run with env.
func New(prefix string, env []string) *Harness {
	return &Harness{prefix: prefix, env: env, procs: map[*exec.Cmd]bool{}}
}

// PrivateXtablesLock returns the environment with XTABLES_LOCKFILE set to a
// lock file of this process's own, and a function that removes the file:
// the machine's /run/xtables.lock may be held by anyone, which would time
// the wait for it instead of the work.
func PrivateXtablesLock(prefix string) (env []string, remove func()) {
	lock := fmt.Sprintf("/run/%s-%d.lock", prefix, os.Getpid())
	return append(os.Environ(), "XTABLES_LOCKFILE="+lock), func() { _ = os.Remove(lock) }
}

// Namespace is a network namespace the Harness created.
type Namespace struct {
	Name   string
	Handle netns.NsHandle
	// NL is a netlink handle bound to the namespace.
	NL *netlink.Handle
}

// NewNamespace creates a namespace with its loopback up.
func (h *Harness) NewNamespace(ctx context.Context) (*Namespace, error) {
	h.mu.Lock()
	h.seq++
	name := fmt.Sprintf("%s-%d-%d", h.prefix, os.Getpid(), h.seq)
	h.names = append(h.names, name)
	h.mu.Unlock()
	if err := RunHost(ctx, "ip", "netns", "add", name); err != nil {
		return nil, err
	}
	if err := RunHost(ctx, "ip", "-n", name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	hd, err := netns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("opening network namespace %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(hd)
	if err != nil {
		hd.Close()
		return nil, fmt.Errorf("netlink in network namespace %s: %w", name, err)
	}
	return &Namespace{Name: name, Handle: hd, NL: nl}, nil
}

// DeleteNamespace kills every process still running and deletes ns.
func (h *Harness) DeleteNamespace(ns *Namespace) error {
	h.KillAll()
	ns.NL.Close()
	ns.Handle.Close()
	err := RunHost(context.Background(), "ip", "netns", "del", ns.Name)
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, n := range h.names {
		if n == ns.Name {
			h.names = append(h.names[:i], h.names[i+1:]...)
			break
		}
	}
	return err
}

// Cleanup kills every process the Harness started and deletes every
// namespace it created. It is safe to call more than once.
func (h *Harness) Cleanup() error {
	h.KillAll()
	h.mu.Lock()
	names := h.names
	h.names = nil
	h.mu.Unlock()
	var errs []error
	for _, n := range names {
		if err := RunHost(context.Background(), "ip", "netns", "del", n); err != nil {
			// A namespace whose creation failed midway may not exist.
			if out, lerr := exec.Command("ip", "netns", "list").Output(); lerr == nil && !bytes.Contains(out, []byte(n)) {
				continue
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// KillAll kills the processes still running and waits for them.
func (h *Harness) KillAll() {
	h.mu.Lock()
	var cmds []*exec.Cmd
	for c := range h.procs {
		cmds = append(cmds, c)
	}
	h.mu.Unlock()
	for _, c := range cmds {
		_ = c.Process.Kill()
	}
	for _, c := range cmds {
		_ = h.Wait(c)
	}
}

// Wait waits for c, started by Start, and forgets it. A process already
// waited for is no error.
func (h *Harness) Wait(c *exec.Cmd) error {
	err := c.Wait()
	h.mu.Lock()
	delete(h.procs, c)
	h.mu.Unlock()
	if errors.Is(err, os.ErrProcessDone) || (err != nil && strings.Contains(err.Error(), "Wait was already called")) {
		return nil
	}
	return err
}

// Command returns, not started, name with args, to be started in a
// namespace by Start. It is killed with ctx, and with this process
// (Pdeathsig).
func (h *Harness) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, name, args...)
	c.Env = h.env
	c.WaitDelay = 5 * time.Second
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

// Start starts c inside ns. The child is forked from an OS thread switched
// into the namespace, so it starts there with no program in between.
// Should the thread fail to switch back, the child, started with
// Pdeathsig, would end with it: the error says so.
func (h *Harness) Start(ns *Namespace, c *exec.Cmd) error {
	return nsthread.Run(ns.Handle, func() error {
		if err := c.Start(); err != nil {
			return err
		}
		h.mu.Lock()
		h.procs[c] = true
		h.mu.Unlock()
		return nil
	})
}

// InNamespace runs f on an OS thread switched into ns and returns f's
// error. Sockets f opens stay in ns after the thread switches back.
func (h *Harness) InNamespace(ns *Namespace, f func() error) error {
	return nsthread.Run(ns.Handle, f)
}

// Run runs name with args inside ns, feeding stdin, and returns its stdout.
// A failure carries the command, the namespace and the program's stderr.
func (h *Harness) Run(ctx context.Context, ns *Namespace, stdin string, name string, args ...string) (string, error) {
	c := h.Command(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if stdin != "" {
		c.Stdin = strings.NewReader(stdin)
	}
	if err := h.Start(ns, c); err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	if err := h.Wait(c); err != nil {
		return stdout.String(), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), ns.Name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// RunHost runs a program that manages namespaces from the outside.
func RunHost(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Outcome reports how a harness's run ended, on stderr as prog, once the
// Harness has been cleaned up (cleanErr), and returns the exit code it
// calls for: 0 and true when the run succeeded and its results may be
// written; 1 when it failed, exceeded bound or could not clean up; 130
// when it was interrupted.
func Outcome(ctx context.Context, prog string, bound time.Duration, runErr, cleanErr error) (code int, ok bool) {
	if cleanErr != nil {
		fmt.Fprintf(os.Stderr, "%s: cleaning up: %v\n", prog, cleanErr)
	}
	switch {
	case runErr != nil && errors.Is(ctx.Err(), context.DeadlineExceeded):
		fmt.Fprintf(os.Stderr, "%s: stopped: the run exceeded its bound of %s (%v); namespaces removed\n", prog, bound, runErr)
		return 1, false
	case runErr != nil && ctx.Err() != nil:
		fmt.Fprintf(os.Stderr, "%s: interrupted (%v); namespaces removed\n", prog, runErr)
		return 130, false
	case runErr != nil:
		fmt.Fprintf(os.Stderr, "%s: %v\n", prog, runErr)
		return 1, false
	case cleanErr != nil:
		return 1, false
	}
	return 0, true
}
