package apply

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/conntrack"
)

// fakeTable is a conntrack table in memory. Like the kernel and the
// in-process filter together, Dump hands on only the entries the Filter
// matches.
type fakeTable struct {
	entries []conntrack.Entry
	// stats is what each Dump returns besides the counts; err, when set,
	// ends the dump of the addresses' family after its entries.
	stats  conntrack.Stats
	err    map[bool]error // by "IPv6"
	dumped []conntrack.Filter
}

func (f *fakeTable) Dump(_ context.Context, flt conntrack.Filter, fn func(conntrack.Entry) error) (conntrack.Stats, error) {
	f.dumped = append(f.dumped, flt)
	st := f.stats
	for _, e := range f.entries {
		st.Received++
		if !flt.Matches(e) {
			continue
		}
		st.Matched++
		if err := fn(e); err != nil {
			return st, err
		}
	}
	return st, f.err[flt.ReplySrc[0].Is6()]
}

var (
	proxy4    = netip.MustParseAddr("10.96.0.2")
	proxy6    = netip.MustParseAddr("fd00::2")
	service4  = netip.MustParseAddrPort("100.64.0.1:443")
	service6  = netip.MustParseAddrPort("[fd00::100:1]:443")
	otherSvc4 = netip.MustParseAddrPort("100.64.0.10:443")
)

// ctEntry is a TCP conntrack entry from client to dst, DNATed to to,
// unanswered unless seen.
func ctEntry(id uint32, client, dst, to netip.AddrPort, seen bool) conntrack.Entry {
	e := conntrack.Entry{
		ID:       id,
		Orig:     conntrack.Tuple{Src: client, Dst: dst, Proto: unix.IPPROTO_TCP},
		Reply:    conntrack.Tuple{Src: to, Dst: client, Proto: unix.IPPROTO_TCP},
		Status:   0x188,
		TCPState: conntrack.TCPSynSent,
	}
	if seen {
		e.Status |= conntrack.StatusSeenReply
		e.TCPState = 3
	}
	return e
}

// equateAddrPorts compares addresses and ports with ==.
var equateAddrPorts = cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestDNATCheckFinds(t *testing.T) {
	ours4, ours6 := netip.AddrPortFrom(proxy4, 443), netip.AddrPortFrom(proxy6, 443)
	table := &fakeTable{entries: []conntrack.Entry{
		ctEntry(1, ap("192.0.2.2:40001"), service4, ours4, false),
		ctEntry(2, ap("192.0.2.3:40002"), service4, ours4, false),
		ctEntry(3, ap("192.0.2.4:40003"), otherSvc4, ours4, false),
		ctEntry(4, ap("[2001:db8::2]:40004"), service6, ours6, false),
		// Answered: the rules are not in its way.
		ctEntry(5, ap("192.0.2.5:40005"), service4, ours4, true),
		// Straight to our address and port: not a DNAT (our rules would
		// untrack it; this one is a SYN dropped before they were in place).
		ctEntry(6, ap("192.0.2.6:40006"), ours4, ours4, false),
		// To another port of our address, DNATed to ours: broken too.
		ctEntry(7, ap("192.0.2.7:40007"), netip.AddrPortFrom(proxy4, 8443), ours4, false),
		// Not from our address, or not from our port.
		ctEntry(8, ap("192.0.2.8:40008"), service4, ap("10.96.0.3:443"), false),
		ctEntry(9, ap("192.0.2.9:40009"), service4, netip.AddrPortFrom(proxy4, 444), false),
	}}
	c := newDNATCheck(table, []netip.Addr{proxy6, proxy4, netip.MustParseAddr("::ffff:10.96.0.2")}, 443)
	got, err := c.Check(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []DNATFinding{
		{Original: netip.AddrPortFrom(proxy4, 8443), To: ours4, New: 1, Example: ap("192.0.2.7:40007")},
		{Original: service4, To: ours4, New: 2, Example: ap("192.0.2.2:40001")},
		{Original: otherSvc4, To: ours4, New: 1, Example: ap("192.0.2.4:40003")},
		{Original: service6, To: ours6, New: 1, Example: ap("[2001:db8::2]:40004")},
	}
	if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
		t.Errorf("findings (-want +got):\n%s", diff)
	}
	// One dump per family, IPv4 first, asking for unanswered TCP from our
	// address and port; the mapped duplicate is gone.
	wantDumps := []conntrack.Filter{
		{ReplySrc: []netip.Addr{proxy4}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true},
		{ReplySrc: []netip.Addr{proxy6}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true},
	}
	if diff := cmp.Diff(wantDumps, table.dumped, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("dumps (-want +got):\n%s", diff)
	}
	if err := c.Unfiltered(); err != nil {
		t.Errorf("Unfiltered() = %v with a kernel that filters", err)
	}
}

func TestDNATCheckReportsEachConnectionOnce(t *testing.T) {
	ours := netip.AddrPortFrom(proxy4, 443)
	first := ctEntry(1, ap("192.0.2.2:40001"), service4, ours, false)
	table := &fakeTable{entries: []conntrack.Entry{first}}
	c := newDNATCheck(table, []netip.Addr{proxy4}, 443)
	ctx := context.Background()
	check := func(what string, want ...DNATFinding) {
		t.Helper()
		got, err := c.Check(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(want) == 0 {
			want = []DNATFinding{}
		}
		if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
			t.Errorf("%s (-want +got):\n%s", what, diff)
		}
	}
	check("first check", DNATFinding{Original: service4, To: ours, New: 1, Example: first.Orig.Src})
	check("same connection again")

	// A new connection, and one whose tuple repeats under another ID (the
	// first one closed, its port used again).
	second := ctEntry(2, ap("192.0.2.3:40002"), service4, ours, false)
	again := first
	again.ID = 3
	table.entries = append(table.entries, second, again)
	check("two more", DNATFinding{Original: service4, To: ours, New: 2, Example: second.Orig.Src})
	check("nothing more")

	// A failed dump reports nothing and forgets nothing.
	table.err = map[bool]error{false: errors.New("receiving conntrack dump: timed out")}
	third := ctEntry(4, ap("192.0.2.4:40004"), service4, ours, false)
	table.entries = append(table.entries, third)
	if got, err := c.Check(ctx); err == nil || got != nil || !strings.Contains(err.Error(), "IPv4 conntrack entries to [10.96.0.2] port 443: receiving conntrack dump: timed out") {
		t.Errorf("failed dump: %v, %v; want nothing and the error", got, err)
	}
	table.err = nil
	check("after the failure", DNATFinding{Original: service4, To: ours, New: 1, Example: third.Orig.Src})

	// Gone from the table, then forgotten: only the last check counts.
	table.entries = nil
	check("empty table")
	if len(c.seen) != 0 {
		t.Errorf("remembers %d connections of an empty table", len(c.seen))
	}
}

func TestDNATCheckMemoryIsBounded(t *testing.T) {
	ours := netip.AddrPortFrom(proxy4, 443)
	table := &fakeTable{}
	const n = maxRemembered + 100
	for i := range n {
		client := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, byte(i >> 8), byte(i)}), 40000)
		table.entries = append(table.entries, ctEntry(uint32(i+1), client, service4, ours, false))
	}
	c := newDNATCheck(table, []netip.Addr{proxy4}, 443)
	for i, want := range []int{n, n - maxRemembered} {
		got, err := c.Check(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].New != want {
			t.Errorf("check %d: %+v; want %d new", i+1, got, want)
		}
		if len(c.seen) > maxRemembered {
			t.Errorf("check %d: remembers %d connections, more than %d", i+1, len(c.seen), maxRemembered)
		}
	}
}

func TestDNATCheckUnfiltered(t *testing.T) {
	table := &fakeTable{stats: conntrack.Stats{KernelFiltered: true, Excess: 7}}
	c := newDNATCheck(table, []netip.Addr{proxy4, proxy6}, 443)
	ctx := context.Background()
	if _, err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	ignored := c.Unfiltered()
	if ignored == nil || !strings.Contains(ignored.Error(), "sent 7 entries it excludes") {
		t.Fatalf("Unfiltered() = %v after the kernel sent entries its filter excludes", ignored)
	}
	table.stats = conntrack.Stats{KernelFiltered: true, Excess: 9}
	if _, err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Unfiltered() != ignored {
		t.Errorf("Unfiltered() changed from %v to %v: a caller logs it once", ignored, c.Unfiltered())
	}

	// A refusal: said once, and the kernel is not asked again.
	table.stats = conntrack.Stats{Refused: unix.EOPNOTSUPP}
	if _, err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	refused := c.Unfiltered()
	if !errors.Is(refused, errRefused) || !errors.Is(refused, unix.EOPNOTSUPP) {
		t.Fatalf("Unfiltered() = %v after a refusal", refused)
	}
	table.dumped = nil
	if _, err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Unfiltered() != refused {
		t.Errorf("Unfiltered() changed from %v to %v", refused, c.Unfiltered())
	}
	if !slices.ContainsFunc(table.dumped, func(f conntrack.Filter) bool { return f.InProcess }) || slices.ContainsFunc(table.dumped, func(f conntrack.Filter) bool { return !f.InProcess }) {
		t.Errorf("after a refusal the dumps still ask the kernel to filter: %+v", table.dumped)
	}
}
