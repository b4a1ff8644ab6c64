package conntrack

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// filterFamily is one address family of the kernel filter tests.
type filterFamily struct {
	name string
	// ours is the address the filter asks for; other is another address
	// on the same node.
	ours, other netip.Addr
	conntrack   string
	iptables    string
	family      uint8
}

var filterFamilies = []filterFamily{
	{"IPv4", netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("10.96.0.3"), "ipv4", "iptables-nft", unix.AF_INET},
	{"IPv6", netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::3"), "ipv6", "ip6tables-nft", unix.AF_INET6},
}

// Connections that fill the table in the kernel filter tests.
const (
	oursAnswered   = 3   // TCP to ours:443, answered
	oursUnanswered = 3   // TCP to ours:443, replies untracked
	toOther        = 400 // TCP to other:443, answered
	toOtherPort    = 300 // TCP to ours:8080, answered
	udpToOurs      = 300 // UDP to ours:443, never answered
)

// fillTable makes a namespace whose conntrack table holds oursAnswered and
// oursUnanswered connections from ours:443 and 1,000 others that differ
// from them in one field each: the address, the port or the protocol.
func fillTable(t *testing.T, fam filterFamily) *netnstest.NS {
	t.Helper()
	ns := netnstest.New(t)
	for _, a := range []netip.Addr{fam.ours, fam.other} {
		args := []string{"addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo"}
		if a.Is6() {
			args = append(args, "nodad")
		}
		ns.Run(t, "ip", args...)
	}
	// A rule that needs conntrack makes the kernel track this namespace.
	ns.Run(t, fam.iptables, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT")
	ours := netip.AddrPortFrom(fam.ours, 443)
	for _, a := range []netip.AddrPort{ours, netip.AddrPortFrom(fam.other, 443), netip.AddrPortFrom(fam.ours, 8080)} {
		listen(t, ns, a)
	}
	var udp net.PacketConn
	if err := ns.Do(t, func() error {
		var err error
		udp, err = net.ListenPacket("udp", ours.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = udp.Close() })

	connect(t, ns, ours, oursAnswered)
	connect(t, ns, netip.AddrPortFrom(fam.other, 443), toOther)
	connect(t, ns, netip.AddrPortFrom(fam.ours, 8080), toOtherPort)
	if err := ns.Do(t, func() error {
		// Each from a port of its own: ephemeral ports may repeat, and a
		// repeated tuple is the same entry.
		for i := range udpToOurs {
			d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(fam.ours, uint16(20000+i)))}
			c, err := d.Dial("udp", ours.String())
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("x"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Replies from ours:443 untracked, as our rules untrack them: the
	// next connections stay unanswered in conntrack's eyes.
	ns.Run(t, fam.iptables, "-t", "raw", "-A", "OUTPUT", "-s", fam.ours.String(), "-p", "tcp", "--sport", "443", "-j", "NOTRACK")
	connect(t, ns, ours, oursUnanswered)
	return ns
}

// listen accepts connections on addr inside ns until the test ends.
func listen(t *testing.T, ns *netnstest.NS, addr netip.AddrPort) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(t, func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	netnstest.Serve(t, ln, func(net.Conn) {})
}

// connect opens and closes n connections to addr from inside ns.
func connect(t *testing.T, ns *netnstest.NS, addr netip.AddrPort, n int) {
	t.Helper()
	if err := ns.Do(t, func() error {
		for range n {
			c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	}); err != nil {
		t.Fatalf("connecting to %s: %v", addr, err)
	}
}

// collect dumps the table through dump and returns the entries handed on,
// by ID.
func collect(t *testing.T, dump func(fn func(Entry) error) (Stats, error)) ([]Entry, Stats) {
	t.Helper()
	var out []Entry
	st, err := dump(func(e Entry) error {
		out = append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(out, func(a, b Entry) int { return int(a.ID) - int(b.ID) })
	return out, st
}

func all(Entry) bool { return true }

// TestKernelFilterNetns proves, against the real kernel, that a dump with
// the kernel filter gets only the entries it asks for among 1,000 that
// differ in one field each, that the whole table filtered in process and
// the fallback after a refused filter give the same answer, and that the
// decoder reads every entry as conntrack -L prints it.
func TestKernelFilterNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "ip6tables-nft", "conntrack")
	ctx := context.Background()
	for _, fam := range filterFamilies {
		t.Run(fam.name, func(t *testing.T) {
			ns := fillTable(t, fam)
			tb := NewTable(ns.NetNS(t))

			// The whole table, as the decoder reads it and as conntrack -L
			// prints it.
			everything, st := collect(t, func(fn func(Entry) error) (Stats, error) {
				return tb.dump(ctx, fam.family, nil, all, fn)
			})
			if min := oursAnswered + oursUnanswered + toOther + toOtherPort + udpToOurs; st.Received < min {
				t.Fatalf("the table holds %d entries, want at least %d", st.Received, min)
			}
			compareWithTool(t, ns, fam, everything)

			answered := Filter{ReplySrc: []netip.Addr{fam.ours}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP}
			// IPv6 addresses are not filtered by the kernel (see
			// kernelFilterFor): the connections to the other address on
			// the same port come too.
			answeredSent := oursAnswered + oursUnanswered
			if fam.ours.Is6() {
				answeredSent += toOther
			}
			unanswered := answered
			unanswered.Unreplied = true
			for _, tc := range []struct {
				name string
				f    Filter
				want int
				// kernelSends is how many entries the kernel sends when it
				// filters.
				kernelSends int
			}{
				{"answered or not", answered, oursAnswered + oursUnanswered, answeredSent},
				// The status filter drops the other address's too.
				{"unanswered", unanswered, oursUnanswered, oursUnanswered},
			} {
				t.Run(tc.name, func(t *testing.T) {
					want := slices.DeleteFunc(slices.Clone(everything), func(e Entry) bool { return !tc.f.Matches(e) })
					if len(want) != tc.want {
						t.Fatalf("the table holds %d entries the filter matches, want %d", len(want), tc.want)
					}
					filtered, st := collect(t, func(fn func(Entry) error) (Stats, error) { return tb.Dump(ctx, tc.f, fn) })
					if diff := cmp.Diff(want, filtered, equateAddrPorts); diff != "" {
						t.Errorf("filtered by the kernel (-want +got):\n%s", diff)
					}
					if wantSt := (Stats{Received: tc.kernelSends, Matched: tc.want, KernelFiltered: true}); st != wantSt {
						t.Errorf("filtered by the kernel: %+v, want %+v", st, wantSt)
					}

					inProcess := tc.f
					inProcess.InProcess = true
					got, st := collect(t, func(fn func(Entry) error) (Stats, error) { return tb.Dump(ctx, inProcess, fn) })
					if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
						t.Errorf("filtered in process (-want +got):\n%s", diff)
					}
					if st.Received < len(everything) || st.KernelFiltered || st.Matched != tc.want {
						t.Errorf("filtered in process: %+v; want all %d entries received", st, len(everything))
					}

					// A filter the kernel refuses (a flag it does not know,
					// as an older kernel does not know ours) falls back to
					// the whole table.
					bad := kernelFilterFor(tc.f, fam.family)
					bad.replyFlags |= 1 << 31
					got, st = collect(t, func(fn func(Entry) error) (Stats, error) {
						return tb.dumpFiltered(ctx, fam.family, bad, tc.f.Matches, fn)
					})
					if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
						t.Errorf("after the kernel refused the filter (-want +got):\n%s", diff)
					}
					if !isRefusal(st.Refused) || st.KernelFiltered || st.Received < len(everything) {
						t.Errorf("after the kernel refused the filter: %+v; want the refusal and all entries received", st)
					}
				})
			}

			if fam.ours.Is6() {
				// Why kernelFilterFor never asks for an IPv6 address: the
				// kernel sends the entries whose address differs.
				k := kernelFilter{replyFlags: filterIPSrc | filterProtoNum | filterProtoSrc, replySrc: fam.ours, proto: unix.IPPROTO_TCP, srcPort: 443}
				got, _ := collect(t, func(fn func(Entry) error) (Stats, error) { return tb.dump(ctx, fam.family, &k, all, fn) })
				ofOurs := slices.ContainsFunc(got, func(e Entry) bool { return e.Reply.Src.Addr() == fam.ours })
				if ofOurs || len(got) != toOther {
					t.Logf("this kernel filters IPv6 addresses by equality: kernelFilterFor could ask for them here")
				} else {
					t.Logf("as expected, the kernel's IPv6 address filter sent the %d entries of %s and none of %s", len(got), fam.other, fam.ours)
				}
			}
		})
	}
}

// compareWithTool requires the decoded entries to be what conntrack -L
// prints, field for field.
func compareWithTool(t *testing.T, ns *netnstest.NS, fam filterFamily, entries []Entry) {
	t.Helper()
	var want []netnstest.ConntrackEntry
	for _, e := range ns.Conntrack(t, fam.conntrack) {
		e.Line = ""
		want = append(want, e)
	}
	var got []netnstest.ConntrackEntry
	for _, e := range entries {
		c := netnstest.ConntrackEntry{
			Proto: "udp", ProtoNum: e.Orig.Proto,
			OrigSrc: e.Orig.Src, OrigDst: e.Orig.Dst, ReplySrc: e.Reply.Src, ReplyDst: e.Reply.Dst,
			Unreplied: !e.SeenReply(), ID: e.ID,
		}
		if e.Orig.Proto == unix.IPPROTO_TCP {
			c.Proto, c.State = "tcp", TCPStateName(e.TCPState)
		}
		got = append(got, c)
	}
	byID := func(a, b netnstest.ConntrackEntry) int { return int(a.ID) - int(b.ID) }
	slices.SortFunc(want, byID)
	slices.SortFunc(got, byID)
	if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
		t.Errorf("decoded entries against conntrack -L (-tool +decoder):\n%s", diff)
	}
	if len(got) == 0 {
		t.Error("no entries to compare")
	}
	t.Logf("%d entries decoded as conntrack -L prints them", len(got))
}
