package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Clients: for every path, an attempt starts every interval, each on a
// worker of its own, so that an attempt hanging on a dropped SYN does not
// delay the next: the longest gap between two successful attempts is the
// outage, to within an interval, rather than the attempts' timeout. An
// attempt is a connect, a few bytes written and read back, and a close,
// all within one timeout well under TCP's first SYN retransmission (1 s):
// a dropped SYN is abandoned instead of waiting for the kernel's back-off.

// path is one client and the address it dials.
type path struct {
	Name   string
	from   *namespace
	target netip.AddrPort
	// control marks the path that does not go through the sidecar's
	// rules or addresses: a pod to the node's own address.
	control bool
}

// pathStats is what a path did in one window.
type pathStats struct {
	Attempted, Failed int
	// Skipped counts attempts not started because every worker was busy:
	// the cadence was not kept. It should stay 0.
	Skipped int
	// MaxGap is the longest time between two successful attempts'
	// completions, including from the last success before the window, and
	// up to the window's end if the path has not recovered by then.
	MaxGap   time.Duration
	FirstErr string
	// failures are the failed attempts' start and end.
	failures []span
	// InStall counts failed attempts that overlap a failed attempt of the
	// control path: the machine, not the sidecar, held them up.
	InStall int
}

// span is a failed attempt, from its start to its end.
type span struct{ from, to time.Time }

// markStalls sets InStall in every path but the control, the last, from
// the control's failures.
func markStalls(stats []pathStats) {
	control := stats[len(stats)-1].failures
	for i := range stats[:len(stats)-1] {
		st := &stats[i]
		for _, f := range st.failures {
			for _, c := range control {
				if f.from.Before(c.to) && c.from.Before(f.to) {
					st.InStall++
					break
				}
			}
		}
	}
}

// pathClient keeps one path's attempts going.
type pathClient struct {
	path
	work chan struct{}

	mu       sync.Mutex
	st       pathStats
	lastOK   time.Time
	okStreak int
}

// clients keeps every path's attempts going until stopped.
type clients struct {
	paths    []*pathClient
	interval time.Duration
	timeout  time.Duration
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

// startClients starts, for each path, a scheduler and enough workers in
// the path's namespace to start an attempt every interval while every
// attempt in flight takes its whole timeout.
func startClients(paths []path, interval, timeout time.Duration) (*clients, error) {
	ctx, cancel := context.WithCancel(context.Background())
	c := &clients{interval: interval, timeout: timeout, stop: cancel}
	workers := int(timeout/interval) + 4
	now := time.Now()
	for _, p := range paths {
		pc := &pathClient{path: p, work: make(chan struct{}), lastOK: now}
		c.paths = append(c.paths, pc)
		errc := make(chan error, workers)
		for range workers {
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				// The thread stays in the namespace and ends with this
				// goroutine.
				if err := enter(p.from); err != nil {
					errc <- err
					return
				}
				errc <- nil
				pc.attempts(ctx, timeout)
			}()
		}
		for range workers {
			if err := <-errc; err != nil {
				cancel()
				c.wg.Wait()
				return nil, err
			}
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			pc.schedule(ctx, interval)
		}()
	}
	return c, nil
}

// close stops every attempt and waits for the workers.
func (c *clients) close() {
	c.stop()
	c.wg.Wait()
}

// schedule hands a worker an attempt every interval.
func (pc *pathClient) schedule(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		select {
		case pc.work <- struct{}{}:
		default:
			pc.mu.Lock()
			pc.st.Skipped++
			pc.mu.Unlock()
		}
	}
}

// attempts runs attempts as the scheduler hands them out.
func (pc *pathClient) attempts(ctx context.Context, timeout time.Duration) {
	dialer := net.Dialer{Control: func(network, address string, rc syscall.RawConn) error {
		// Closing with a reset instead of a FIN leaves no TIME_WAIT behind:
		// hundreds of connections a second for minutes would otherwise
		// run through the ephemeral ports. The close is still a close of
		// an exchange that completed.
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
		})
		return errors.Join(err, serr)
	}}
	msg := []byte("availability ping")
	buf := make([]byte, len(msg))
	for {
		select {
		case <-ctx.Done():
			return
		case <-pc.work:
		}
		start := time.Now()
		err := attempt(&dialer, pc.target, msg, buf, timeout)
		pc.record(start, time.Now(), err)
	}
}

// attempt connects to target, writes msg, reads it back into buf and
// closes, all within timeout.
func attempt(d *net.Dialer, target netip.AddrPort, msg, buf []byte, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	dl := *d
	dl.Deadline = deadline
	c, err := dl.Dial("tcp", target.String())
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("reading back: %w", err)
	}
	if !bytes.Equal(buf, msg) {
		return fmt.Errorf("echoed %q, want %q", buf, msg)
	}
	return nil
}

func (pc *pathClient) record(start, now time.Time, err error) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.st.Attempted++
	if err != nil {
		pc.st.Failed++
		pc.st.failures = append(pc.st.failures, span{start, now})
		pc.okStreak = 0
		if pc.st.FirstErr == "" {
			pc.st.FirstErr = err.Error()
		}
		return
	}
	if gap := now.Sub(pc.lastOK); gap > pc.st.MaxGap {
		pc.st.MaxGap = gap
	}
	if now.After(pc.lastOK) {
		pc.lastOK = now
	}
	pc.okStreak++
}

// begin starts a window: every path's counts start from 0. A gap that
// began before it and ends in it counts in it.
func (c *clients) begin() {
	for _, pc := range c.paths {
		pc.mu.Lock()
		pc.st = pathStats{}
		pc.mu.Unlock()
	}
}

// end closes the window and returns every path's stats, in path order.
func (c *clients) end() []pathStats {
	now := time.Now()
	var out []pathStats
	for _, pc := range c.paths {
		pc.mu.Lock()
		st := pc.st
		if open := now.Sub(pc.lastOK); open > st.MaxGap && pc.okStreak == 0 {
			st.MaxGap = open
		}
		pc.mu.Unlock()
		out = append(out, st)
	}
	markStalls(out)
	return out
}

// healthyStreak is how many successes in a row make a path healthy again.
const healthyStreak = 10

// waitHealthy waits until every path has had healthyStreak successful
// attempts in a row, all after since.
func (c *clients) waitHealthy(ctx context.Context, since time.Time, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(c.interval)
	defer tick.Stop()
	for {
		var sick []string
		for _, pc := range c.paths {
			pc.mu.Lock()
			ok := pc.okStreak >= healthyStreak && pc.lastOK.After(since)
			errText := pc.st.FirstErr
			pc.mu.Unlock()
			if !ok {
				sick = append(sick, fmt.Sprintf("%s (first error in this window: %s)", pc.Name, errText))
			}
		}
		if len(sick) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not reachable again within %s: %v", timeout, sick)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// echoServer serves, in ns, an echo server on each address until ctx ends.
// It binds with IP_FREEBIND, as a proxy does that must listen on an
// address before the node has it (the ClusterIP is on the node only while
// it is intercepted, and an address deleted under the proxy's feet must
// not close its listener).
func (h *harness) echoServer(ctx context.Context, ns *namespace, addrs ...netip.AddrPort) error {
	lc := net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
		})
		return errors.Join(err, serr)
	}}
	for _, a := range addrs {
		var ln net.Listener
		if err := h.inNamespace(ns, func() error {
			var err error
			ln, err = lc.Listen(ctx, "tcp4", a.String())
			return err
		}); err != nil {
			return fmt.Errorf("listening on %s in %s: %w", a, ns.Name, err)
		}
		go func() {
			<-ctx.Done()
			_ = ln.Close()
		}()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					// Every client closes after its echo; the deadline ends
					// one whose close never arrives.
					_ = c.SetDeadline(time.Now().Add(2 * time.Second))
					_, _ = io.Copy(c, c)
				}()
			}
		}()
	}
	return nil
}

// duringWrites says how many failed attempts of the paths through the
// sidecar overlapped one of writes.
func duringWrites(stats []pathStats, writes []span) string {
	failed, during := 0, 0
	for _, st := range stats[:len(stats)-1] {
		for _, f := range st.failures {
			failed++
			for _, w := range writes {
				if f.from.Before(w.to) && w.from.Before(f.to) {
					during++
					break
				}
			}
		}
	}
	if failed == 0 {
		return ""
	}
	return fmt.Sprintf("; %d of the %d failed attempts overlapped a restore of the writer's", during, failed)
}
