package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

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
	// repairs and errors count, across every sidecar instance, the
	// repairs and the errors they logged.
	repairs, errors int
}

// logCounts returns the repairs and errors every sidecar logged so far.
func (h *harness) logCounts() (repairs, errors int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.repairs, h.errors
}

func newHarness(env []string) *harness {
	return &harness{env: env, procs: map[*exec.Cmd]bool{}}
}

// namespace is a network namespace the harness created.
type namespace struct {
	Name   string
	handle netns.NsHandle
}

// newNamespace creates apavail-<pid>-<n> with its loopback up.
func (h *harness) newNamespace(ctx context.Context) (*namespace, error) {
	h.mu.Lock()
	h.seq++
	name := fmt.Sprintf("apavail-%d-%d", os.Getpid(), h.seq)
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
	return &namespace{Name: name, handle: hd}, nil
}

// cleanup kills every process the harness started and deletes every
// namespace it created. It is safe to call more than once.
func (h *harness) cleanup() error {
	h.mu.Lock()
	var cmds []*exec.Cmd
	for c := range h.procs {
		cmds = append(cmds, c)
	}
	names := h.names
	h.names = nil
	h.mu.Unlock()
	for _, c := range cmds {
		_ = c.Process.Kill()
	}
	for _, c := range cmds {
		_ = h.wait(c)
	}
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

// start starts c inside ns: the child is forked from an OS thread switched
// into the namespace.
func (h *harness) start(ns *namespace, c *exec.Cmd) error {
	return h.inNamespace(ns, func() error {
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
// error (netnstest.DoIn). Sockets f opens stay in ns after the thread
// switches back.
func (h *harness) inNamespace(ns *namespace, f func() error) error {
	return netnstest.DoIn(ns.handle, f)
}

// enter locks the calling goroutine to its OS thread and switches that
// thread into ns for good: the thread ends with the goroutine, so it is
// never reused elsewhere. Every socket the goroutine opens is in ns.
func enter(ns *namespace) error {
	runtime.LockOSThread()
	if err := netns.Set(ns.handle); err != nil {
		return fmt.Errorf("entering network namespace %s: %w", ns.Name, err)
	}
	return nil
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

// sidecar is one running instance of the sidecar's daemon.
type sidecar struct {
	h     *harness
	cmd   *exec.Cmd
	ready chan struct{} // closed when it logs its first sync's result
	done  chan struct{} // closed when its log ends

	mu   sync.Mutex
	tail []string
}

// readyLine and readyOK are in what the daemon logs (at -v=2) when a sync
// has put, or found, the address and the rules in place.
const (
	readyLine = `"Sync finished"`
	readyOK   = "ok=true"
)

// startSidecar starts bin with args in ns.
func (h *harness) startSidecar(ctx context.Context, ns *namespace, bin string, args ...string) (*sidecar, error) {
	c := h.command(ctx, bin, args...)
	pipe, err := c.StderrPipe()
	if err != nil {
		return nil, err
	}
	s := &sidecar{h: h, cmd: c, ready: make(chan struct{}), done: make(chan struct{})}
	if err := h.start(ns, c); err != nil {
		return nil, err
	}
	go s.read(pipe)
	return s, nil
}

func (s *sidecar) read(r io.Reader) {
	defer close(s.done)
	sc := bufio.NewScanner(r)
	ready := false
	for sc.Scan() {
		line := sc.Text()
		if !ready && strings.Contains(line, readyLine) && strings.Contains(line, readyOK) {
			ready = true
			close(s.ready)
		}
		s.mu.Lock()
		s.tail = append(s.tail[max(0, len(s.tail)-20):], line)
		s.mu.Unlock()
		repair := strings.Contains(line, `"Repaired `)
		failure := strings.HasPrefix(line, "E")
		if repair || failure {
			s.h.mu.Lock()
			if repair {
				s.h.repairs++
			}
			if failure {
				s.h.errors++
			}
			s.h.mu.Unlock()
		}
	}
}

// lastLog is the end of the sidecar's log, for errors.
func (s *sidecar) lastLog() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.tail, "\n")
}

// waitReady waits until the sidecar's first sync put everything in place.
func (s *sidecar) waitReady(ctx context.Context, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-s.ready:
		return nil
	case <-s.done:
		return fmt.Errorf("the sidecar exited before it was ready: %s", s.lastLog())
	case <-t.C:
		return fmt.Errorf("the sidecar was not ready after %s: %s", timeout, s.lastLog())
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop sends sig and waits for the process to end. After SIGTERM the exit
// must be clean; after SIGKILL any end will do.
func (s *sidecar) stop(sig syscall.Signal) error {
	if err := s.cmd.Process.Signal(sig); err != nil {
		return err
	}
	<-s.done
	err := s.h.wait(s.cmd)
	if sig == syscall.SIGKILL {
		return nil
	}
	if err != nil {
		return fmt.Errorf("the sidecar, stopped with %s: %w: %s", sig, err, s.lastLog())
	}
	return nil
}
