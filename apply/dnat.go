package apply

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/conntrack"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// UntrackedDNAT is one connection DNATed from Original to one of our
// addresses, To, whose replies our rules untrack: the reply leaves with
// To as its source, the client, which dialled Original, resets it, and
// the connection never opens. conntrack shows it as
//
//	tcp SYN_SENT src=CLIENT dst=ORIGINAL ... [UNREPLIED] src=TO dst=CLIENT ...
//
// The cure is to list Original's address in --ip-address too, so that it
// is intercepted before any DNAT, or to run without --setup-iptables.
type UntrackedDNAT struct {
	Original, To netip.AddrPort
	// Client is the source of the connection.
	Client netip.AddrPort
}

// DNATFinding is what one Check found for one (Original, To): New
// connections seen for the first time, Example the client of one of them.
type DNATFinding struct {
	Original, To netip.AddrPort
	New          int
	Example      netip.AddrPort
}

// conntrackTable is the seam over internal/conntrack; conntrack.Table
// satisfies it.
type conntrackTable interface {
	Dump(ctx context.Context, f conntrack.Filter, fn func(conntrack.Entry) error) (conntrack.Stats, error)
}

// maxRemembered bounds how many connections a DNATCheck remembers from one
// check to the next. Past it, connections that were not remembered are
// counted as new again by the next check: with that many broken
// connections on a node the count matters less than the line in the log.
const maxRemembered = 16384

// DNATCheck finds connections DNATed into our addresses whose replies are
// untracked (see UntrackedDNAT), from the conntrack table: one dump per
// address family, filtered by the kernel where it can.
//
// Its answer means something only while our rules are in place: without
// them, a DNATed connection is answered through conntrack. DNATCheck is
// not safe for concurrent use.
type DNATCheck struct {
	table conntrackTable
	// families holds our addresses by family, IPv4 first.
	families [][]netip.Addr
	port     uint16
	// seen holds the connections the previous check found.
	seen map[dnatKey]struct{}
	// inProcess is set once the kernel refused the filter: later dumps
	// do not ask again.
	inProcess bool
	// unfiltered says why the kernel does not filter, once known.
	unfiltered error
}

// dnatKey tells one conntrack entry from another: its ID and tuples.
type dnatKey struct {
	id          uint32
	orig, reply conntrack.Tuple
}

// NewDNATCheck returns a DNATCheck of the current network namespace for
// connections to addrs on port.
func NewDNATCheck(addrs []netip.Addr, port uint16) *DNATCheck {
	return NewDNATCheckAt(netns.None(), addrs, port)
}

// NewDNATCheckAt is NewDNATCheck in network namespace ns.
func NewDNATCheckAt(ns netns.NsHandle, addrs []netip.Addr, port uint16) *DNATCheck {
	return newDNATCheck(conntrack.NewTable(ns), addrs, port)
}

func newDNATCheck(t conntrackTable, addrs []netip.Addr, port uint16) *DNATCheck {
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		switch {
		case slices.Contains(v4, a) || slices.Contains(v6, a):
		case render.FamilyOf(a) == render.IPv4:
			v4 = append(v4, a)
		default:
			v6 = append(v6, a)
		}
	}
	c := &DNATCheck{table: t, port: port}
	for _, f := range [][]netip.Addr{v4, v6} {
		if len(f) > 0 {
			c.families = append(c.families, f)
		}
	}
	return c
}

// Check returns the connections DNATed into our addresses and left
// unanswered that it sees for the first time since the previous Check,
// one DNATFinding per (Original, To), sorted. A connection is told by its
// conntrack ID and tuples; only the previous check's connections are
// remembered. On an error nothing is reported and nothing forgotten: the
// next check compares with the last one that succeeded.
func (c *DNATCheck) Check(ctx context.Context) ([]DNATFinding, error) {
	now := make(map[dnatKey]struct{}, len(c.seen))
	found := map[[2]netip.AddrPort]*DNATFinding{}
	for _, addrs := range c.families {
		f := conntrack.Filter{
			ReplySrc:     addrs,
			ReplySrcPort: c.port,
			Proto:        unix.IPPROTO_TCP,
			Unreplied:    true,
			InProcess:    c.inProcess,
		}
		st, err := c.table.Dump(ctx, f, func(e conntrack.Entry) error {
			d, ok := c.untracked(e)
			if !ok {
				return nil
			}
			k := dnatKey{id: e.ID, orig: e.Orig, reply: e.Reply}
			if len(now) < maxRemembered {
				now[k] = struct{}{}
			}
			if _, old := c.seen[k]; old {
				return nil
			}
			g := found[[2]netip.AddrPort{d.Original, d.To}]
			if g == nil {
				g = &DNATFinding{Original: d.Original, To: d.To, Example: d.Client}
				found[[2]netip.AddrPort{d.Original, d.To}] = g
			}
			g.New++
			return nil
		})
		c.note(st)
		if err != nil {
			return nil, fmt.Errorf("listing %s conntrack entries to %v port %d: %w", render.FamilyOf(addrs[0]), addrs, c.port, err)
		}
	}
	c.seen = now
	out := make([]DNATFinding, 0, len(found))
	for _, g := range found {
		out = append(out, *g)
	}
	slices.SortFunc(out, func(a, b DNATFinding) int {
		return cmp.Or(a.Original.Compare(b.Original), a.To.Compare(b.To))
	})
	return out, nil
}

// untracked returns the connection e stands for when it is one of ours
// DNATed from elsewhere and unanswered. The dump's filter has already
// checked the reply tuple (our address and port, TCP) and that no reply
// was seen; what is left is the original destination: a connection to one
// of our addresses and port is untracked by our rules and never listed,
// so an entry for one is not a DNAT (a SYN dropped before our rules were
// in place, say).
func (c *DNATCheck) untracked(e conntrack.Entry) (UntrackedDNAT, bool) {
	if e.SeenReply() || e.Orig.Proto != unix.IPPROTO_TCP {
		return UntrackedDNAT{}, false
	}
	if e.Orig.Dst.Port() == c.port && c.ours(e.Orig.Dst.Addr()) {
		return UntrackedDNAT{}, false
	}
	return UntrackedDNAT{Original: e.Orig.Dst, To: e.Reply.Src, Client: e.Orig.Src}, true
}

func (c *DNATCheck) ours(a netip.Addr) bool {
	for _, f := range c.families {
		if slices.Contains(f, a) {
			return true
		}
	}
	return false
}

// note keeps what a dump's stats tell of the kernel's filter.
func (c *DNATCheck) note(st conntrack.Stats) {
	switch {
	case st.Refused != nil:
		c.inProcess = true
		if !errors.Is(c.unfiltered, errRefused) {
			c.unfiltered = fmt.Errorf("%w (%w): each check reads the whole conntrack table", errRefused, st.Refused)
		}
	case st.Excess > 0 && c.unfiltered == nil:
		c.unfiltered = fmt.Errorf("the kernel ignored part of the conntrack filter and sent %d entries it excludes: they are dropped in process", st.Excess)
	}
}

var errRefused = errors.New("the kernel refused the conntrack filter")

// Unfiltered returns, once a check has found out, why the kernel does not
// filter the conntrack dumps as asked (an older kernel); nil while it
// does. The checks' answers are the same either way; only their cost
// differs. It does not change once set, except from ignoring part of the
// filter to refusing it, so a caller can log it once.
func (c *DNATCheck) Unfiltered() error { return c.unfiltered }
