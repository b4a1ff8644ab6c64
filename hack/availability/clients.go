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
	// failures are the failed attempts, in the order they ended.
	failures []failure
	// InStall counts failed attempts that overlap a failed attempt of the
	// control path: the machine, not the sidecar, held them up.
	InStall int
	// Late counts failed attempts whose every packet the kernel had
	// answered when the client gave up (see judge): the measuring process
	// ran late, the path was open.
	Late int
	// Own counts failed attempts neither in a stall nor late: the ones
	// held against the sidecar.
	Own int
}

// span is a stretch of time: a failed attempt, or a restore of the
// writer's.
type span struct{ from, to time.Time }

// failure is one failed attempt: when, what the client saw, and what the
// kernel had done with its socket by then.
type failure struct {
	span
	err string
	// connectAfter is how long after the attempt's start its socket was
	// created and its connect issued; -1 where it never was.
	connectAfter time.Duration
	late         bool
	why          string
}

// markStalls sets InStall in every path but the control, the last, from
// the control's failures, and Own: the failures neither in a stall nor
// late.
func markStalls(stats []pathStats) {
	control := stats[len(stats)-1].failures
	for i := range stats[:len(stats)-1] {
		st := &stats[i]
		st.InStall, st.Own = 0, 0
		for _, f := range st.failures {
			stalled := false
			for _, c := range control {
				if f.from.Before(c.to) && c.from.Before(f.to) {
					stalled = true
					break
				}
			}
			if stalled {
				st.InStall++
			} else if !f.late {
				st.Own++
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
	// since is when the window began: an attempt started before it
	// belongs to no window (the one before waited for it in end).
	since time.Time
	// busy is, per worker, the start of its attempt in flight (zero when
	// idle).
	busy []time.Time
}

// clients keeps every path's attempts going until stopped.
type clients struct {
	paths    []*pathClient
	interval time.Duration
	timeout  time.Duration
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

// socketStock is how long the sockets a socketSource keeps ready last.
const socketStock = 200 * time.Millisecond

// startClients starts, for each path, a scheduler and enough workers to
// start an attempt every interval while every attempt in flight takes its
// whole timeout, and for each namespace a socketSource.
func startClients(paths []path, interval, timeout time.Duration) (*clients, error) {
	ctx, cancel := context.WithCancel(context.Background())
	c := &clients{interval: interval, timeout: timeout, stop: cancel}
	workers := int(timeout/interval) + 4
	now := time.Now()
	sources := map[*namespace]*socketSource{}
	for _, p := range paths {
		pc := &pathClient{path: p, work: make(chan struct{}), lastOK: now, busy: make([]time.Time, workers)}
		c.paths = append(c.paths, pc)
		src := sources[p.from]
		if src == nil {
			// Stock for every path from the namespace, for socketStock.
			n := 0
			for _, q := range paths {
				if q.from == p.from {
					n++
				}
			}
			var err error
			if src, err = newSocketSource(ctx, p.from, n*int(socketStock/interval), &c.wg); err != nil {
				cancel()
				c.wg.Wait()
				return nil, err
			}
			sources[p.from] = src
		}
		for w := range workers {
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				pc.attempts(ctx, src, timeout, w)
			}()
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

// attempts runs attempts as the scheduler hands them out, on sockets
// from src, as worker w.
func (pc *pathClient) attempts(ctx context.Context, src *socketSource, timeout time.Duration, w int) {
	msg := []byte("availability ping")
	buf := make([]byte, len(msg))
	for {
		select {
		case <-ctx.Done():
			return
		case <-pc.work:
		}
		pc.mu.Lock()
		pc.busy[w] = time.Now()
		pc.mu.Unlock()
		start, end, f := judgedAttempt(src, pc.target, msg, buf, timeout)
		pc.record(start, end, f, w)
	}
}

// judgedAttempt makes one attempt within timeout and returns its start and
// end and, where it failed, the failure with the kernel's view of its
// socket when the client gave up.
func judgedAttempt(src *socketSource, target netip.AddrPort, msg, buf []byte, timeout time.Duration) (start, end time.Time, f *failure) {
	start = time.Now()
	sock, connectAt, err := attempt(src, target, msg, buf, start.Add(timeout))
	end = time.Now()
	if err != nil {
		f = &failure{span: span{start, end}, err: err.Error(), connectAfter: -1}
		var info *unix.TCPInfo
		if !connectAt.IsZero() {
			f.connectAfter = connectAt.Sub(start)
			if info, err = unix.GetsockoptTCPInfo(sock, unix.IPPROTO_TCP, unix.TCP_INFO); err != nil {
				info = nil
			}
		}
		f.late, f.why = judge(info, !connectAt.IsZero())
	}
	if sock >= 0 {
		// The last reference: the reset goes out now.
		_ = unix.Close(sock)
	}
	return start, end, f
}

// TCP states as TCP_INFO gives them (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpSynSent     = 2
)

// judge says, from the kernel's view of a failed attempt's socket when the
// client gave up, whether the path had answered everything the client had
// sent (late: the client, or the echo server, both in this process, did
// not run in time) and what had happened. A dropped SYN is sent again only
// after 1 s, far beyond the timeout: a socket found established with
// nothing retransmitted had its first SYN answered. info is nil where it
// could not be read; issued says whether the connect was issued at all.
func judge(info *unix.TCPInfo, issued bool) (late bool, why string) {
	switch {
	case !issued:
		return true, "the timeout ran out before the connect was issued"
	case info == nil:
		return false, "the socket's state could not be read"
	case info.State == tcpSynSent:
		return false, "the SYN was not answered"
	case info.Total_retrans > 0:
		return false, fmt.Sprintf("%d segments sent again: lost on the way", info.Total_retrans)
	case info.State != tcpEstablished:
		return false, fmt.Sprintf("the socket was in TCP state %d", info.State)
	case info.Data_segs_out == 0:
		return true, "the handshake had completed, the client had not written yet"
	case info.Unacked > 0:
		return false, "the data sent was not acknowledged"
	case info.Bytes_received > 0:
		return true, fmt.Sprintf("the echo had arrived (%d bytes), the client had not read it", info.Bytes_received)
	default:
		return true, "the server's kernel had acknowledged the data, the echo server had not answered"
	}
}

// attempt takes a socket from src, connects it to target, writes msg,
// reads it back into buf and closes the connection, all by deadline. It
// returns the socket, still open, for the caller to judge a failure by and
// close (-1 where there was none), and when the connect was issued (zero
// where it was not).
func attempt(src *socketSource, target netip.AddrPort, msg, buf []byte, deadline time.Time) (sock int, connectAt time.Time, err error) {
	sock, err = src.get(deadline)
	if err != nil {
		return -1, time.Time{}, err
	}
	// Closing with a reset instead of a FIN leaves no TIME_WAIT behind:
	// hundreds of connections a second for minutes would otherwise run
	// through the ephemeral ports. The close is still a close of an
	// exchange that completed.
	if err := unix.SetsockoptLinger(sock, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		return sock, time.Time{}, err
	}
	c, err := dial(sock, target, deadline, &connectAt)
	if err != nil {
		return sock, connectAt, fmt.Errorf("connecting to %s: %w", target, cause(err))
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		return sock, connectAt, fmt.Errorf("writing to %s: %w", target, cause(err))
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return sock, connectAt, fmt.Errorf("reading back from %s: %w", target, cause(err))
	}
	if !bytes.Equal(buf, msg) {
		return sock, connectAt, fmt.Errorf("%s echoed %q, want %q", target, buf, msg)
	}
	return sock, connectAt, nil
}

// cause is err without the addresses net.OpError adds: a connection made
// from a file has none to give.
func cause(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		return oe.Err
	}
	return err
}

// record counts worker w's attempt from start to now, failed where f is
// not nil, in the window it started in.
func (pc *pathClient) record(start, now time.Time, f *failure, w int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.busy[w] = time.Time{}
	if start.Before(pc.since) {
		// Started before this window began, it is the last one's, or
		// between windows: a SYN dropped in an outage that ended there
		// must not fail in the next scenario.
		if f == nil && now.After(pc.lastOK) {
			pc.lastOK = now
		}
		return
	}
	pc.st.Attempted++
	if f != nil {
		pc.st.Failed++
		if f.late {
			pc.st.Late++
		}
		pc.st.failures = append(pc.st.failures, *f)
		pc.okStreak = 0
		if pc.st.FirstErr == "" {
			pc.st.FirstErr = f.err
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
	now := time.Now()
	for _, pc := range c.paths {
		pc.mu.Lock()
		pc.st = pathStats{}
		pc.since = now
		pc.mu.Unlock()
	}
}

// end closes the window, once every attempt started in it has ended (at
// most a timeout later), and returns every path's stats, in path order.
func (c *clients) end() []pathStats {
	cut := time.Now()
	deadline := cut.Add(c.timeout + time.Second)
	tick := time.NewTicker(c.interval)
	defer tick.Stop()
	for c.inFlightBefore(cut) && time.Now().Before(deadline) {
		<-tick.C
	}
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

// inFlightBefore says whether an attempt started before t is still going.
func (c *clients) inFlightBefore(t time.Time) bool {
	for _, pc := range c.paths {
		pc.mu.Lock()
		for _, b := range pc.busy {
			if !b.IsZero() && b.Before(t) {
				pc.mu.Unlock()
				return true
			}
		}
		pc.mu.Unlock()
	}
	return false
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
		if err := h.InNamespace(ns, func() error {
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
