package main

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

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// harness owns every namespace and every process it creates, so that it
// can remove them all on any exit.
type harness struct {
	env []string // environment of every program started in a namespace

	mu    sync.Mutex
	seq   int
	names []string
	procs map[*exec.Cmd]bool
}

func newHarness(env []string) *harness {
	return &harness{env: env, procs: map[*exec.Cmd]bool{}}
}

// namespace is a network namespace the harness created.
type namespace struct {
	Name   string
	handle netns.NsHandle
	nl     *netlink.Handle
}

// newNamespace creates apbench-<pid>-<n> with its loopback up.
func (h *harness) newNamespace(ctx context.Context) (*namespace, error) {
	h.mu.Lock()
	h.seq++
	name := fmt.Sprintf("apbench-%d-%d", os.Getpid(), h.seq)
	h.names = append(h.names, name)
	h.mu.Unlock()
	if err := runHost(ctx, "ip", "netns", "add", name); err != nil {
		return nil, err
	}
	if err := runHost(ctx, "ip", "-n", name, "link", "set", "lo", "up"); err != nil {
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
	return &namespace{Name: name, handle: hd, nl: nl}, nil
}

// deleteNamespace kills what runs in ns and deletes it.
func (h *harness) deleteNamespace(ns *namespace) error {
	h.killAll()
	ns.nl.Close()
	ns.handle.Close()
	err := runHost(context.Background(), "ip", "netns", "del", ns.Name)
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

// cleanup kills every process the harness started and deletes every
// namespace it created. It is safe to call more than once.
func (h *harness) cleanup() error {
	h.killAll()
	h.mu.Lock()
	names := h.names
	h.names = nil
	h.mu.Unlock()
	var errs []error
	for _, n := range names {
		if err := runHost(context.Background(), "ip", "netns", "del", n); err != nil {
			// A namespace whose creation failed midway may not exist.
			if out, lerr := exec.Command("ip", "netns", "list").Output(); lerr == nil && !bytes.Contains(out, []byte(n)) {
				continue
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killAll kills the processes still running and waits for them.
func (h *harness) killAll() {
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
		h.wait(c)
	}
}

// wait waits for c, started by start, and forgets it.
func (h *harness) wait(c *exec.Cmd) error {
	err := c.Wait()
	h.mu.Lock()
	delete(h.procs, c)
	h.mu.Unlock()
	if errors.Is(err, os.ErrProcessDone) || (err != nil && strings.Contains(err.Error(), "Wait was already called")) {
		return nil
	}
	return err
}

// command returns, not started, name with args, to be started in a
// namespace by start.
func (h *harness) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, name, args...)
	c.Env = h.env
	c.WaitDelay = 5 * time.Second
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return c
}

// start starts c inside ns. The child is forked from an OS thread switched
// into the namespace, so it starts there with no program in between: ours
// and the baselines are all started this way. Should the thread fail to
// switch back, the child, started with Pdeathsig, would end with it: the
// error says so.
func (h *harness) start(ns *namespace, c *exec.Cmd) error {
	return netnstest.DoIn(ns.handle, func() error {
		if err := c.Start(); err != nil {
			return err
		}
		h.mu.Lock()
		h.procs[c] = true
		h.mu.Unlock()
		return nil
	})
}

// inNamespace runs f on an OS thread switched into ns and returns f's
// error. Sockets f opens stay in ns after the thread switches back.
func (h *harness) inNamespace(ns *namespace, f func() error) error {
	return netnstest.DoIn(ns.handle, f)
}

// run runs name with args inside ns, feeding stdin, and returns its stdout.
func (h *harness) run(ctx context.Context, ns *namespace, stdin string, name string, args ...string) (string, error) {
	c := h.command(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if stdin != "" {
		c.Stdin = strings.NewReader(stdin)
	}
	if err := h.start(ns, c); err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	if err := h.wait(c); err != nil {
		return stdout.String(), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), ns.Name, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// runHost runs a program that manages namespaces from the outside.
func runHost(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
