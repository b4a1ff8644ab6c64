package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"
)

// harness is nsrun's, with what every sidecar instance logged counted.
type harness struct {
	*nsrun.Harness

	mu sync.Mutex
	// repairs and errors count, across every sidecar instance, the
	// repairs and the errors they logged.
	repairs, errors int
}

// namespace is a network namespace the harness created
// (apavail-<pid>-<n>).
type namespace = nsrun.Namespace

func newHarness(env []string) *harness { return &harness{Harness: nsrun.New("apavail", env)} }

// logCounts returns the repairs and errors every sidecar logged so far.
func (h *harness) logCounts() (repairs, errors int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.repairs, h.errors
}

// enter locks the calling goroutine to its OS thread and switches that
// thread into ns for good: the thread ends with the goroutine, so it is
// never reused elsewhere. Every socket the goroutine opens is in ns.
func enter(ns *namespace) error {
	runtime.LockOSThread()
	if err := netns.Set(ns.Handle); err != nil {
		return fmt.Errorf("entering network namespace %s: %w", ns.Name, err)
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
	c := h.Command(ctx, bin, args...)
	pipe, err := c.StderrPipe()
	if err != nil {
		return nil, err
	}
	s := &sidecar{h: h, cmd: c, ready: make(chan struct{}), done: make(chan struct{})}
	if err := h.Start(ns, c); err != nil {
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
	err := s.h.Wait(s.cmd)
	if sig == syscall.SIGKILL {
		return nil
	}
	if err != nil {
		return fmt.Errorf("the sidecar, stopped with %s: %w: %s", sig, err, s.lastLog())
	}
	return nil
}
