package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A socket belongs for its whole life to the network namespace of the
// thread that created it: only socket(2) needs to run in the namespace. A
// socketSource is the one OS thread per namespace that creates the
// clients' sockets, ahead of need; the attempts run on ordinary
// goroutines.
//
// With a locked OS thread per worker instead (64 per path, over 300 in
// all), every wake-up of a worker hands one of the process's few Ps
// (GOMAXPROCS: one per CPU) to that very thread, and while the thread
// waits for a CPU on a busy machine the P runs nothing else: the clients
// and the echo server stalled together, and attempts failed that the
// kernel had answered in microseconds.
type socketSource struct {
	ns    *namespace
	socks chan int
	err   atomic.Pointer[error] // the last socket(2) failure
}

// socketRefill is how often a socketSource tops its stock up.
const socketRefill = 10 * time.Millisecond

// newSocketSource starts a thread in ns that keeps up to stock unconnected
// TCP sockets ready until ctx ends, then closes those left.
func newSocketSource(ctx context.Context, ns *namespace, stock int, wg *sync.WaitGroup) (*socketSource, error) {
	s := &socketSource{ns: ns, socks: make(chan int, stock)}
	errc := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		// The thread stays in the namespace and ends with this goroutine.
		if err := enter(ns); err != nil {
			errc <- err
			return
		}
		errc <- nil
		tick := time.NewTicker(socketRefill)
		defer tick.Stop()
		for {
			// Only this goroutine sends: below capacity, a send never blocks.
			for len(s.socks) < cap(s.socks) {
				fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					err = fmt.Errorf("socket in %s: %w", ns.Name, err)
					s.err.Store(&err)
					break
				}
				s.socks <- fd
			}
			select {
			case <-ctx.Done():
				for {
					select {
					case fd := <-s.socks:
						_ = unix.Close(fd)
					default:
						return
					}
				}
			case <-tick.C:
			}
		}
	}()
	if err := <-errc; err != nil {
		return nil, err
	}
	return s, nil
}

// get returns a socket of the namespace, waiting for one until deadline.
// The caller closes it.
func (s *socketSource) get(deadline time.Time) (int, error) {
	select {
	case fd := <-s.socks:
		return fd, nil
	default:
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case fd := <-s.socks:
		return fd, nil
	case <-t.C:
		err := fmt.Errorf("no socket of %s's namespace ready within the timeout", s.ns.Name)
		if last := s.err.Load(); last != nil {
			err = fmt.Errorf("%w (last failure: %w)", err, *last)
		}
		return -1, err
	}
}

// dial connects sock, a socket from a socketSource, to target by deadline,
// and returns a net.Conn on a duplicate of it: sock itself stays open for
// the caller to read the kernel's view of the connection from, and to
// close. It sets *connectAt when it issues the connect.
func dial(sock int, target netip.AddrPort, deadline time.Time, connectAt *time.Time) (net.Conn, error) {
	dup, err := unix.FcntlInt(uintptr(sock), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(dup), "client")
	c, err := net.FileConn(f) // a duplicate of its own, in the poller
	_ = f.Close()
	if err != nil {
		return nil, err
	}
	if err := c.SetDeadline(deadline); err != nil {
		_ = c.Close()
		return nil, err
	}
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		_ = c.Close()
		return nil, err
	}
	sa := &unix.SockaddrInet4{Port: int(target.Port()), Addr: target.Addr().As4()}
	issued := false
	var cerr error
	werr := rc.Write(func(fd uintptr) bool {
		if !issued {
			issued = true
			*connectAt = time.Now()
			cerr = unix.Connect(int(fd), sa)
			return !errors.Is(cerr, unix.EINPROGRESS)
		}
		// Writable: the connect has finished, or, as for net.Dialer, the
		// socket was writable before it began (a socket not yet connected
		// is); only a peer name says it is connected.
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		switch {
		case err != nil:
			cerr = err
		case v != 0:
			cerr = unix.Errno(v)
		default:
			_, err := unix.Getpeername(int(fd))
			if errors.Is(err, unix.ENOTCONN) {
				return false
			}
			cerr = err
		}
		return true
	})
	if err := errors.Join(werr, cerr); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}
