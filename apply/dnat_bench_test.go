package apply

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/conntrack"
)

// statsTable is a conntrack table that keeps the stats of its last dump.
type statsTable struct {
	conntrack.Table
	last conntrack.Stats
}

func (s *statsTable) Dump(ctx context.Context, f conntrack.Filter, fn func(conntrack.Entry) error) (conntrack.Stats, error) {
	st, err := s.Table.Dump(ctx, f, fn)
	s.last = st
	return st, err
}

// benchUnrelated is how many unrelated entries the node's conntrack table
// holds in BenchmarkDNATCheck.
const benchUnrelated = 10000

// BenchmarkDNATCheck measures one Check on a node (IPv4, nft) whose
// conntrack table holds three broken DNATed connections and 10,000
// unrelated ones: with the kernel filtering the dump, and with the whole
// table read and filtered in process, as on a kernel that refuses the
// filter. entries/op is how many entries the kernel sent. Filtered, the
// cost is mostly the kernel's walk of its whole conntrack hash table
// (nf_conntrack_buckets, shared by all namespaces), whatever it holds.
func BenchmarkDNATCheck(b *testing.B) {
	fam := dnatFamilies[0]
	n := newDNATNode(b, BackendNFT, fam)
	n.loadRules(b)
	for i := range 3 {
		// The SYN creates the entry; waiting for the dial to give up
		// proves nothing more here.
		from := netip.AddrPortFrom(fam.pod.Addr(), uint16(40001+i))
		_ = n.pod.Do(b, func() error {
			d := net.Dialer{Timeout: 100 * time.Millisecond, LocalAddr: net.TCPAddrFromAddrPort(from)}
			if c, err := d.Dial("tcp", n.dnatService().String()); err == nil {
				c.Close()
				b.Fatalf("connected to %s through the broken DNAT", n.dnatService())
			}
			return nil
		})
	}
	unrelated := netip.MustParseAddrPort("127.0.0.1:8080")
	listenEchoIn(b, n.node, unrelated)
	if err := n.node.Do(b, func() error {
		// Each from a port of its own: the kernel reuses a loopback
		// port in TIME_WAIT, and a repeated tuple is the same entry.
		for i := range benchUnrelated {
			from := netip.AddrPortFrom(unrelated.Addr(), uint16(20000+i))
			d := net.Dialer{Timeout: workingTimeout, LocalAddr: net.TCPAddrFromAddrPort(from)}
			c, err := d.Dial("tcp", unrelated.String())
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}

	for _, tc := range []struct {
		name      string
		inProcess bool
	}{{"filtered", false}, {"unfiltered", true}} {
		b.Run(tc.name, func(b *testing.B) {
			table := &statsTable{Table: conntrack.NewTable(n.node.NetNS(b))}
			c := newDNATCheck(table, []netip.Addr{fam.proxy}, dnatPort)
			c.inProcess = tc.inProcess
			ctx := context.Background()
			got, err := c.Check(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if len(got) != 1 || got[0].New != 3 {
				b.Fatalf("first Check = %+v; want the three broken connections", got)
			}
			if tc.inProcess && table.last.Received < benchUnrelated {
				b.Fatalf("the unfiltered dump received %d entries, fewer than %d", table.last.Received, benchUnrelated)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Check(ctx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(table.last.Received), "entries/op")
		})
	}
}
