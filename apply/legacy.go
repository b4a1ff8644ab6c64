package apply

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vishvananda/netns"
	"k8s.io/klog/v2"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// legacyReader reads what the legacy backend keeps in the kernel,
// in-process (internal/xtables), where iptables-legacy-save would cost a
// process per table.
type legacyReader interface {
	// legacyRead returns what table holds of the chains ours accepts, or
	// says it does not recognise some rule (xtables.Table.Unrecognised).
	legacyRead(f render.Family, table string, ours func(string) bool) (xtables.Table, error)
	// legacyInfo returns what IPT_SO_GET_INFO tells of table:
	// microseconds, and different after any change that adds, deletes or
	// resizes a rule. A table the kernel does not list has the zero
	// TableInfo.
	legacyInfo(f render.Family, table string) (xtables.TableInfo, error)
}

// xtablesReader reads the legacy tables of a network namespace for
// hostNode. Its sockets are opened on first use and kept: they hold no
// table between reads. It is not safe for concurrent use.
type xtablesReader struct {
	ns    netns.NsHandle
	socks map[render.Family]*xtables.Socket
}

func newXtablesReader(ns netns.NsHandle) *xtablesReader {
	return &xtablesReader{ns: ns, socks: map[render.Family]*xtables.Socket{}}
}

func xtFamily(f render.Family) xtables.Family {
	if f == render.IPv6 {
		return xtables.IPv6
	}
	return xtables.IPv4
}

func (x *xtablesReader) socket(f render.Family) (*xtables.Socket, error) {
	if s := x.socks[f]; s != nil {
		return s, nil
	}
	s, err := xtables.Open(x.ns, xtFamily(f))
	if err != nil {
		return nil, err
	}
	x.socks[f] = s
	return s, nil
}

func (x *xtablesReader) read(f render.Family, table string, ours func(string) bool) (xtables.Table, error) {
	s, err := x.socket(f)
	if err != nil {
		return xtables.Table{}, err
	}
	var t xtables.Table
	err = s.Entries(table, func(in xtables.TableInfo, b []byte) error {
		var err error
		t, err = xtables.Walk(xtFamily(f), in, b, ours)
		return err
	})
	if err != nil {
		return xtables.Table{}, fmt.Errorf("reading legacy %s table %s in-process: %w", f, table, err)
	}
	return t, nil
}

func (x *xtablesReader) info(f render.Family, table string) (xtables.TableInfo, error) {
	s, err := x.socket(f)
	if err != nil {
		return xtables.TableInfo{}, err
	}
	in, err := s.Info(table)
	if errors.Is(err, xtables.ErrNoTable) {
		return xtables.TableInfo{}, nil
	}
	return in, err
}

// legacyPollEvery is how often watchLegacy asks the kernel for the info of
// each legacy table we use. One ask costs about 10 µs whatever the table's
// size (internal/xtables BenchmarkInfo), so the four tables of a
// dual-stack node polled every 100 ms cost 0.04% of a core, and a flush or
// a deleted jump is noticed 50 ms after it on average, 100 ms at worst:
// that leaves most of the 250 ms repair target to the debounce and the
// repair itself.
const legacyPollEvery = 100 * time.Millisecond

// After a change, the tables are polled every legacyPollFast until
// legacyFastFor passes without one: where a writer changes a table
// several times in a row (a firewall reload, an operator's script), each
// change is seen within 10 ms, not 100.
const (
	legacyPollFast = 10 * time.Millisecond
	legacyFastFor  = time.Second
)

// LegacySeen is the info of each legacy table we use as this process last
// knew it, shared by the poller and the syncs: a poll that reads anything
// else reports a change, and a sync that finds our rules in place, or puts
// them there and reads them back, records the info it found them under.
//
// A poller comparing only with its own last poll misses the undoing of a
// repair: it reads the drifted info, we repair, another writer drifts the
// table again before the next poll, and that poll reads the drifted info
// once more. Knowing what the repair left, the poll sees the change.
//
// The zero LegacySeen is empty and ready to use; its methods are safe for
// concurrent use, and a nil *LegacySeen records nothing.
type LegacySeen struct {
	mu   sync.Mutex
	info map[legacyTable]xtables.TableInfo
}

type legacyTable struct {
	family render.Family
	name   string
}

// record makes in the info last known of table name of family f.
func (l *LegacySeen) record(f render.Family, name string, in xtables.TableInfo) {
	if l == nil {
		return
	}
	l.swap(f, name, in)
}

// swap records in as the info of table name of family f and reports
// whether it differs from what was known before (nothing known differs).
func (l *LegacySeen) swap(f render.Family, name string, in xtables.TableInfo) (changed bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := legacyTable{f, name}
	old, known := l.info[k]
	if l.info == nil {
		l.info = map[legacyTable]xtables.TableInfo{}
	}
	l.info[k] = in
	return !known || old != in
}

// watchLegacy sends TriggerLegacyChange whenever the info of a legacy
// table we use differs from what w.LegacySeen knows: the legacy backend
// has no change events, but every rule added, deleted or resized, and
// every flush, changes a table's entry count or size. A rewrite that
// leaves them all equal (a rule replaced by one of the same size, a
// policy) is not seen here; the next sync that reads the rules sees it.
func (w Watchers) watchLegacy(ctx context.Context, send func(Trigger)) error {
	ns := netns.None()
	if w.Namespace != nil {
		ns = *w.Namespace
	}
	type polled struct {
		s      *xtables.Socket
		family render.Family
		table  string
	}
	var tables []polled
	seen := map[render.Family]bool{}
	for _, a := range w.Addrs {
		f := render.FamilyOf(a)
		if seen[f] {
			continue
		}
		seen[f] = true
		s, err := xtables.Open(ns, xtFamily(f))
		if err != nil {
			return fmt.Errorf("opening a socket to poll the legacy %s tables: %w", f, err)
		}
		defer s.Close()
		rs, err := render.Chains(f)
		if err != nil {
			return err
		}
		for _, t := range rs.Tables {
			tables = append(tables, polled{s, f, t.Name})
		}
	}
	known := w.LegacySeen
	if known == nil {
		known = &LegacySeen{}
	}
	var polls []legacyPoll
	for _, p := range tables {
		polls = append(polls, legacyPoll{p.family, p.table, func() (xtables.TableInfo, error) {
			in, err := p.s.Info(p.table)
			if errors.Is(err, xtables.ErrNoTable) {
				return xtables.TableInfo{}, nil
			}
			return in, err
		}})
	}
	poll := func() (bool, error) { return pollLegacy(polls, known) }
	if _, err := poll(); err != nil {
		return err
	}
	send(TriggerLegacyChange)
	period := legacyPollEvery
	var lastChange time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(period):
		}
		changed, err := poll()
		if err != nil {
			return err
		}
		now := time.Now()
		if changed {
			send(TriggerLegacyChange)
			lastChange = now
		}
		period = legacyPollEvery
		if now.Sub(lastChange) < legacyFastFor {
			period = legacyPollFast
		}
	}
}

// legacyPoll is one legacy table the poller asks for its info.
type legacyPoll struct {
	family render.Family
	table  string
	info   func() (xtables.TableInfo, error)
}

// pollLegacy reads the info of each of polls and reports whether any
// differs from what known knew, which then knows the new info.
func pollLegacy(polls []legacyPoll, known *LegacySeen) (changed bool, err error) {
	for _, p := range polls {
		in, err := p.info()
		if err != nil {
			return false, fmt.Errorf("polling the legacy %s table %s: %w", p.family, p.table, err)
		}
		if known.swap(p.family, p.table, in) {
			klog.V(4).InfoS("Legacy table changed", "family", p.family, "table", p.table, "entries", in.NumEntries, "size", in.Size)
			changed = true
		}
	}
	return changed, nil
}
