package apply

import (
	"context"
	"errors"
	"fmt"
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
// legacyFastFor passes without one: a change and its undoing (our repair
// and another writer restoring what it had read before it) can fall
// within one legacyPollEvery and leave the info as it was, unseen.
const (
	legacyPollFast = 10 * time.Millisecond
	legacyFastFor  = time.Second
)

// watchLegacy sends TriggerLegacyChange whenever the info of a legacy
// table we use changes: the legacy backend has no change events, but
// every rule added, deleted or resized, and every flush, changes a
// table's entry count or size. A rewrite that leaves them all equal (a
// rule replaced by one of the same size, a policy) is not seen here; the
// next sync that reads the rules sees it.
func (w Watchers) watchLegacy(ctx context.Context, send func(Trigger)) error {
	ns := netns.None()
	if w.Namespace != nil {
		ns = *w.Namespace
	}
	type polled struct {
		s     *xtables.Socket
		table string
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
			tables = append(tables, polled{s, t.Name})
		}
	}
	last := make([]xtables.TableInfo, len(tables))
	poll := func() (changed bool, err error) {
		for i, p := range tables {
			in, err := p.s.Info(p.table)
			if errors.Is(err, xtables.ErrNoTable) {
				in, err = xtables.TableInfo{}, nil
			}
			if err != nil {
				return false, fmt.Errorf("polling the legacy %s table %s: %w", p.s.Family(), p.table, err)
			}
			if in != last[i] {
				klog.V(4).InfoS("Legacy table changed", "family", p.s.Family(), "table", p.table, "entries", in.NumEntries, "size", in.Size)
				last[i], changed = in, true
			}
		}
		return changed, nil
	}
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
