package netnstest

import (
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestNewNamespaceIsIsolated(t *testing.T) {
	a, b := New(t), New(t)
	a.Run(t, "ip", "addr", "add", "192.0.2.1/32", "dev", "lo")

	if got := a.Run(t, "ip", "-o", "addr", "show", "dev", "lo"); !strings.Contains(got, "192.0.2.1/32") {
		t.Errorf("address added in %s is missing there:\n%s", a.Name, got)
	}
	if got := b.Run(t, "ip", "-o", "addr", "show"); strings.Contains(got, "192.0.2.1") {
		t.Errorf("address added in %s is visible in %s:\n%s", a.Name, b.Name, got)
	}
	if got := a.Run(t, "ip", "link", "show", "lo"); !strings.Contains(got, "UP") {
		t.Errorf("lo in %s is not up:\n%s", a.Name, got)
	}
}

func TestDoOpensSocketsInsideTheNamespace(t *testing.T) {
	a, b := New(t), New(t)
	a.Run(t, "ip", "addr", "add", "192.0.2.1/32", "dev", "lo")

	var ln net.Listener
	if err := a.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", "192.0.2.1:0")
		return err
	}); err != nil {
		t.Fatalf("listening in %s: %v", a.Name, err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_ = c.Close()
		}
		accepted <- err
	}()

	if err := a.Do(t, func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		t.Fatalf("dialing %s from inside %s: %v", ln.Addr(), a.Name, err)
	}
	select {
	case err := <-accepted:
		if err != nil {
			t.Fatalf("accepting in %s: %v", a.Name, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("listener did not accept the connection")
	}

	// The address exists only in a: from b there is no route to it.
	err := b.Do(t, func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err == nil {
			_ = c.Close()
			return errors.New("connected")
		}
		return nil
	})
	if err != nil {
		t.Errorf("dialing %s from %s: %v, want failure", ln.Addr(), b.Name, err)
	}
}

func TestVethConnectsTwoNamespaces(t *testing.T) {
	a, b := New(t), New(t)
	Veth(t, a, b, "va", "vb")
	a.Run(t, "ip", "addr", "add", "192.0.2.10/24", "dev", "va")
	b.Run(t, "ip", "addr", "add", "192.0.2.11/24", "dev", "vb")

	var ln net.Listener
	if err := a.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", "192.0.2.10:0")
		return err
	}); err != nil {
		t.Fatalf("listening in %s: %v", a.Name, err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		if c, err := ln.Accept(); err == nil {
			_ = c.Close()
		}
	}()

	if err := b.Do(t, func() error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		t.Fatalf("dialing %s from %s over the veth pair: %v", ln.Addr(), b.Name, err)
	}
}

func TestHandleIsBoundToTheNamespace(t *testing.T) {
	ns := New(t)
	ns.Run(t, "ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
	h := ns.Handle(t)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatalf("LinkByName(lo) in %s: %v", ns.Name, err)
	}
	addrs, err := h.AddrList(lo, 0)
	if err != nil {
		t.Fatalf("AddrList(lo) in %s: %v", ns.Name, err)
	}
	for _, a := range addrs {
		if a.IP.String() == "192.0.2.1" {
			return
		}
	}
	t.Errorf("handle for %s does not see 192.0.2.1 on lo: %v", ns.Name, addrs)
}

func TestNamespaceIsDeletedAtCleanup(t *testing.T) {
	var name string
	t.Run("create", func(t *testing.T) {
		ns := New(t)
		ns.Handle(t)
		name = ns.Name
		if got := listNamespaces(t); !strings.Contains(got, name) {
			t.Fatalf("namespace %s missing from `ip netns list`:\n%s", name, got)
		}
	})
	if name == "" {
		t.Skip("subtest was skipped")
	}
	if got := listNamespaces(t); strings.Contains(got, name) {
		t.Errorf("namespace %s still listed after cleanup:\n%s", name, got)
	}
}

func listNamespaces(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}

func TestParseConntrackLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		want ConntrackEntry
	}{
		{
			line: "tcp      6 119 SYN_SENT src=192.0.2.2 dst=100.64.0.1 sport=40001 dport=443 [UNREPLIED] src=10.96.0.2 dst=192.0.2.2 sport=443 dport=40001 mark=0 use=1 id=3422523",
			want: ConntrackEntry{
				Proto: "tcp", ProtoNum: 6, State: "SYN_SENT",
				OrigSrc: netip.MustParseAddrPort("192.0.2.2:40001"), OrigDst: netip.MustParseAddrPort("100.64.0.1:443"),
				ReplySrc: netip.MustParseAddrPort("10.96.0.2:443"), ReplyDst: netip.MustParseAddrPort("192.0.2.2:40001"),
				Unreplied: true, ID: 3422523,
			},
		},
		{
			line: "udp      17 29 src=fd00::1 dst=fd00::2 sport=5353 dport=53 src=fd00::2 dst=fd00::1 sport=53 dport=5353 mark=0 use=1 id=4294967295",
			want: ConntrackEntry{
				Proto: "udp", ProtoNum: 17,
				OrigSrc: netip.MustParseAddrPort("[fd00::1]:5353"), OrigDst: netip.MustParseAddrPort("[fd00::2]:53"),
				ReplySrc: netip.MustParseAddrPort("[fd00::2]:53"), ReplyDst: netip.MustParseAddrPort("[fd00::1]:5353"),
				ID: 4294967295,
			},
		},
	} {
		got, err := ParseConntrackLine(tc.line)
		tc.want.Line = tc.line
		if err != nil || got != tc.want {
			t.Errorf("ParseConntrackLine(%q) =\n%+v, %v; want\n%+v", tc.line, got, err, tc.want)
		}
	}
	for _, bad := range []string{
		"",
		"tcp 6",
		"tcp 6 119",
		"tcp 6 119 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2",
		"tcp 6 119 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 src=10.0.0.2 dst=10.0.0.1 sport=2 dport=x",
		"tcp 6 119 ESTABLISHED sport=1 src=10.0.0.1",
		"udp 17 29 src=10.0.0.1 dst=10.0.0.2 src=10.0.0.2 dst=10.0.0.1 src=10.0.0.3",
		"udp x 29 src=10.0.0.1 dst=10.0.0.2 src=10.0.0.2 dst=10.0.0.1",
	} {
		if e, err := ParseConntrackLine(bad); err == nil {
			t.Errorf("ParseConntrackLine(%q) = %+v; want an error", bad, e)
		}
	}
}
