package main

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

func TestJudge(t *testing.T) {
	established := func(mod func(*unix.TCPInfo)) *unix.TCPInfo {
		i := &unix.TCPInfo{State: tcpEstablished}
		mod(i)
		return i
	}
	for _, tc := range []struct {
		name   string
		info   *unix.TCPInfo
		issued bool
		late   bool
		why    string
	}{
		{"connect never issued", nil, false, true, "before the connect was issued"},
		{"state unreadable", nil, true, false, "could not be read"},
		{"SYN unanswered", &unix.TCPInfo{State: tcpSynSent}, true, false, "SYN was not answered"},
		{"SYN sent again", &unix.TCPInfo{State: tcpEstablished, Total_retrans: 1}, true, false, "sent again"},
		{"reset", &unix.TCPInfo{State: 7}, true, false, "TCP state 7"},
		{"connected, nothing written", established(func(*unix.TCPInfo) {}), true, true, "had not written yet"},
		{"data not acknowledged", established(func(i *unix.TCPInfo) { i.Data_segs_out, i.Unacked = 1, 1 }), true, false, "not acknowledged"},
		{"echo unread", established(func(i *unix.TCPInfo) { i.Data_segs_out, i.Bytes_received = 1, 17 }), true, true, "had not read it"},
		{"echo never sent", established(func(i *unix.TCPInfo) { i.Data_segs_out = 1 }), true, true, "echo server had not answered"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			late, why := judge(tc.info, tc.issued)
			if late != tc.late || !strings.Contains(why, tc.why) {
				t.Errorf("judge = %v, %q; want %v, containing %q", late, why, tc.late, tc.why)
			}
		})
	}
}

// TestAttemptsJudgedByTheKernel makes real attempts in a namespace of its
// own: to an echo server, to a port whose SYNs the firewall drops, and to
// a listener whose process never reads, and checks each failure's verdict
// against what the kernel did.
func TestAttemptsJudgedByTheKernel(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft")
	tns := netnstest.New(t)
	ns := &namespace{Name: tns.Name, Handle: tns.NetNS(t)}
	const echoPort, droppedPort, silentPort = 7001, 7002, 7003
	tns.Run(t, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", strconv.Itoa(droppedPort), "--syn", "-j", "DROP")

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	h := newHarness(nil)
	addr := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port) }
	if err := h.echoServer(ctx, ns, addr(echoPort)); err != nil {
		t.Fatal(err)
	}
	var silent net.Listener
	if err := h.InNamespace(ns, func() (err error) {
		silent, err = net.Listen("tcp4", addr(silentPort).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = silent.Close() })
	src, err := newSocketSource(ctx, ns, 4, &wg)
	if err != nil {
		t.Fatal(err)
	}

	msg := []byte("availability ping")
	buf := make([]byte, len(msg))
	const timeout = 300 * time.Millisecond
	if _, _, f := judgedAttempt(src, addr(echoPort), msg, buf, timeout); f != nil {
		t.Fatalf("attempt to the echo server failed: %s (%s)", f.err, f.why)
	}
	for _, tc := range []struct {
		port uint16
		late bool
		why  string
	}{
		{droppedPort, false, "the SYN was not answered"},
		{silentPort, true, "the server's kernel had acknowledged the data, the echo server had not answered"},
	} {
		start, end, f := judgedAttempt(src, addr(tc.port), msg, buf, timeout)
		switch {
		case f == nil:
			t.Errorf("port %d: the attempt succeeded, want a failure", tc.port)
		case f.late != tc.late || f.why != tc.why:
			t.Errorf("port %d: failure %q judged late=%v, %q; want late=%v, %q", tc.port, f.err, f.late, f.why, tc.late, tc.why)
		case f.connectAfter < 0 || end.Sub(start) < timeout:
			t.Errorf("port %d: connect issued after %s, gave up after %s: want it issued, and the whole %s waited", tc.port, f.connectAfter, end.Sub(start), timeout)
		}
	}
}

// TestAttemptCountsInTheWindowItStarted: an attempt that started before a
// window began (its SYN dropped in the last scenario's outage) and fails
// inside it is not counted there.
func TestAttemptCountsInTheWindowItStarted(t *testing.T) {
	t0 := time.Now()
	pc := &pathClient{lastOK: t0, busy: make([]time.Time, 2)}
	c := &clients{paths: []*pathClient{pc}, interval: time.Millisecond, timeout: 10 * time.Millisecond}
	c.begin()
	before := pc.since.Add(-100 * time.Millisecond)
	pc.record(before, pc.since.Add(200*time.Millisecond), &failure{err: "i/o timeout"}, 0)
	pc.record(pc.since, pc.since.Add(time.Millisecond), &failure{err: "i/o timeout"}, 1)
	st := c.end()[0]
	if st.Attempted != 1 || st.Failed != 1 {
		t.Errorf("attempted %d, failed %d; want 1 and 1: only the attempt started in the window", st.Attempted, st.Failed)
	}
}
