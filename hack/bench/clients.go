package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/kubeproxy"
)

// Client paths: a pod's connections to the `kubernetes` Service's ClusterIP
// on a node whose kube-proxy DNATs it to the proxy's address, measured two
// ways. Through the DNAT: the sidecar keeps only the address, without
// rules, and every connection is tracked and NATed. Intercepted: the
// ClusterIP is on the node too, with the five rules for both addresses,
// so the connection reaches the proxy's listener on the ClusterIP,
// untracked.

const (
	clientClusterIP = "100.64.0.1"
	// The veth between the node's namespace and the pod's.
	nodeVethAddr = "192.0.2.1/24"
	podVethAddr  = "192.0.2.2/24"
	// connectTimeout bounds one connect: a SYN that is never answered
	// makes the path fail instead of waiting for TCP's retries.
	connectTimeout = 2 * time.Second
)

// clientPath is one way a pod's connection to the ClusterIP takes.
type clientPath int

const (
	viaDNAT clientPath = iota
	intercepted
)

var clientPathKinds = []clientPath{viaDNAT, intercepted}

func (p clientPath) String() string {
	return [...]string{
		"through kube-proxy's DNAT (`--ip-address " + benchIP + "`, no rules: tracked)",
		"intercepted (`--ip-address " + benchIP + "," + clientClusterIP + " --setup-iptables`: untracked)",
	}[p]
}

// sidecarArgs is the one-shot run that puts p's state in place.
func (p clientPath) sidecarArgs(bin, backend string) []string {
	if p == viaDNAT {
		return []string{bin, "--ip-address", benchIP, "--daemon=false"}
	}
	return []string{bin, "--ip-address", benchIP + "," + clientClusterIP, "--setup-iptables", "--iptables-backend=" + backend, "--daemon=false"}
}

// clientResult is what one client path cost.
type clientResult struct {
	Backend string
	Path    clientPath
	Conns   int
	Elapsed time.Duration
	// P50 and P99 are of connect() alone: SYN out, SYN-ACK back.
	P50, P99 time.Duration
	// Entries is how many conntrack entries the node's namespace held after
	// the connections, above what it held before; entries of closed
	// connections (TIME_WAIT) count.
	Entries int
}

// Rate is connections set up (connect, then close) per second.
func (r clientResult) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Conns) / r.Elapsed.Seconds()
}

// EntriesPer1000 is Entries per 1,000 connections.
func (r clientResult) EntriesPer1000() float64 {
	if r.Conns == 0 {
		return 0
	}
	return float64(r.Entries) * 1000 / float64(r.Conns)
}

// clientPaths measures both client paths on backend: a node namespace with
// kube-proxy's rules for the `kubernetes` Service (loaded with backend's
// iptables-restore) and a listener on each address, and for each path a
// pod namespace of its own joined to it by a veth, from which connections
// are made one at a time. A fresh pod for each path: the ports its closed
// connections keep in TIME_WAIT would slow the next path's connects.
func (b *bench) clientPaths(ctx context.Context, backend string) (res []clientResult, err error) {
	node, err := b.h.NewNamespace(ctx)
	if err != nil {
		return nil, err
	}
	defer func() {
		if derr := b.h.DeleteNamespace(node); derr != nil && err == nil {
			err = derr
		}
	}()
	if _, err := b.h.Run(ctx, node, kubeproxy.KubernetesService(netip.AddrPortFrom(netip.MustParseAddr(clientClusterIP), benchPort), netip.AddrPortFrom(netip.MustParseAddr(benchIP), benchPort)), "iptables-"+backend+"-restore", "--noflush"); err != nil {
		return nil, fmt.Errorf("loading kube-proxy's rules: %w", err)
	}
	target := netip.AddrPortFrom(netip.MustParseAddr(clientClusterIP), benchPort)
	for _, p := range clientPathKinds {
		argv := p.sidecarArgs(b.bin, backend)
		if _, err := b.h.Run(ctx, node, "", argv[0], argv[1:]...); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		// The proxy listens on every address it serves; the ClusterIP is
		// on the node once it is intercepted.
		listenOn := benchIP
		if p == intercepted {
			listenOn = clientClusterIP
		}
		stop, err := b.h.acceptAndClose(node, netip.AddrPortFrom(netip.MustParseAddr(listenOn), benchPort))
		if err != nil {
			return nil, err
		}
		r, err := b.clientPath(ctx, node, target)
		stop()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		r.Backend, r.Path = backend, p
		b.log("  %-6s %-14s %d connections, %.0f/s, connect p50 %s p99 %s, %.0f conntrack entries per 1,000",
			backend, []string{"through DNAT", "intercepted"}[p], r.Conns, r.Rate(), fmtMicros(r.P50), fmtMicros(r.P99), r.EntriesPer1000())
		res = append(res, r)
	}
	return res, nil
}

// clientPath creates a pod namespace joined to node by a veth and routed
// through it, runs connectLoop from it, and deletes it.
func (b *bench) clientPath(ctx context.Context, node *namespace, target netip.AddrPort) (r clientResult, err error) {
	pod, err := b.h.NewNamespace(ctx)
	if err != nil {
		return r, err
	}
	defer func() {
		if derr := b.h.DeleteNamespace(pod); derr != nil && err == nil {
			err = derr
		}
	}()
	for _, args := range [][]string{
		{"-n", node.Name, "link", "add", "veth-node", "type", "veth", "peer", "name", "veth-pod", "netns", pod.Name},
		{"-n", node.Name, "link", "set", "veth-node", "up"},
		{"-n", pod.Name, "link", "set", "veth-pod", "up"},
		{"-n", node.Name, "addr", "add", nodeVethAddr, "dev", "veth-node"},
		{"-n", pod.Name, "addr", "add", podVethAddr, "dev", "veth-pod"},
		{"-n", pod.Name, "route", "add", "default", "via", strings.Split(nodeVethAddr, "/")[0]},
	} {
		if err := nsrun.RunHost(ctx, "ip", args...); err != nil {
			return r, err
		}
	}
	return b.connectLoop(ctx, node, pod, target)
}

// connectLoop connects from pod to target and closes, one connection at a
// time, for ClientTime or ClientConns connections, whichever comes first,
// after a few to warm up; and counts the conntrack entries node gained.
func (b *bench) connectLoop(ctx context.Context, node, pod *namespace, target netip.AddrPort) (clientResult, error) {
	var r clientResult
	for range 20 {
		if _, err := b.h.connectFrom(pod, target); err != nil {
			return r, fmt.Errorf("warming up: %w", err)
		}
	}
	before, err := b.h.conntrackCount(node)
	if err != nil {
		return r, err
	}
	lat := make([]time.Duration, 0, b.plan.ClientConns)
	start := time.Now()
	err = b.h.InNamespace(pod, func() error {
		for len(lat) < b.plan.ClientConns && time.Since(start) < b.plan.ClientTime {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			d, err := connectOnce(target)
			if err != nil {
				return fmt.Errorf("connection %d to %s: %w", len(lat)+1, target, err)
			}
			lat = append(lat, d)
		}
		return nil
	})
	r.Elapsed = time.Since(start)
	if err != nil {
		return r, err
	}
	after, err := b.h.conntrackCount(node)
	if err != nil {
		return r, err
	}
	r.Conns, r.Entries = len(lat), after-before
	slices.Sort(lat)
	r.P50, r.P99 = percentile(lat, 50), percentile(lat, 99)
	return r, nil
}

// percentile is the nearest-rank p-th percentile of sorted.
func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (len(sorted)*p + 99) / 100 // ceil(n * p / 100), from 1
	return sorted[max(0, min(len(sorted), i)-1)]
}

// connectFrom is connectOnce from inside ns.
func (h *harness) connectFrom(ns *namespace, target netip.AddrPort) (time.Duration, error) {
	var d time.Duration
	err := h.InNamespace(ns, func() error {
		var err error
		d, err = connectOnce(target)
		return err
	})
	return d, err
}

// connectOnce makes one TCP connection to target (IPv4) on the calling
// thread and closes it; it returns how long connect took, from the call
// until the socket is connected. Raw system calls keep Go's poller out of
// the figure: a non-blocking connect, then poll(2) for the handshake's end.
func connectOnce(target netip.AddrPort) (time.Duration, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Port: int(target.Port()), Addr: target.Addr().As4()}
	start := time.Now()
	err = unix.Connect(fd, sa)
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return time.Since(start), fmt.Errorf("connect: %w", err)
	}
	if err != nil {
		deadline := start.Add(connectTimeout)
		for {
			left := time.Until(deadline)
			if left <= 0 {
				return time.Since(start), fmt.Errorf("connect: no answer within %s", connectTimeout)
			}
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			n, err := unix.Poll(fds, int(left.Milliseconds())+1)
			if errors.Is(err, unix.EINTR) {
				continue // a signal to the runtime, not to us
			}
			if err != nil {
				return time.Since(start), fmt.Errorf("poll: %w", err)
			}
			if n > 0 {
				break
			}
		}
	}
	d := time.Since(start)
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return d, fmt.Errorf("SO_ERROR: %w", err)
	}
	if soerr != 0 {
		return d, fmt.Errorf("connect: %w", unix.Errno(soerr))
	}
	return d, nil
}

// acceptAndClose listens on addr inside ns, until stop is called, and
// closes every connection it accepts once the client has closed it. The
// client closes first, so its end keeps the port in TIME_WAIT and never
// reuses it during the run: every connection is a conntrack entry of its
// own where conntrack tracks them.
func (h *harness) acceptAndClose(ns *namespace, addr netip.AddrPort) (stop func(), err error) {
	var ln net.Listener
	if err := h.InNamespace(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		return nil, fmt.Errorf("listening on %s in %s: %w", addr, ns.Name, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = c.SetReadDeadline(time.Now().Add(connectTimeout))
				_, _ = c.Read(make([]byte, 1)) // EOF: the client closed
				_ = c.Close()
			}()
		}
	}()
	return func() {
		_ = ln.Close()
		wg.Wait()
	}, nil
}

// conntrackCount is how many connections conntrack holds in ns: the
// namespace's own nf_conntrack_count, read on a thread inside it.
func (h *harness) conntrackCount(ns *namespace) (int, error) {
	var n int
	err := h.InNamespace(ns, func() error {
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if err != nil {
			return err
		}
		n, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("conntrack count in %s: %w", ns.Name, err)
	}
	return n, nil
}
