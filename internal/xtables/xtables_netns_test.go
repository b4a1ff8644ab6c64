package xtables

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

var record = flag.Bool("record", false, "record the tables of TestRecord into testdata/")

func families() []Family { return []Family{IPv4, IPv6} }

// TestReaderAgreesWithSave builds tables with the real
// iptables-legacy-restore and checks that the in-process walk tells of
// our chains and jumps exactly what iptables-legacy-save prints.
func TestReaderAgreesWithSave(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-legacy-restore", "ip6tables-legacy-restore")
	for _, f := range families() {
		for _, tc := range []struct {
			name  string
			build func(t *testing.T, ns *netnstest.NS) tables
		}{
			{"empty", func(*testing.T, *netnstest.NS) tables {
				ts := tables{}
				ts.table("raw")
				ts.table("filter")
				return ts
			}},
			{"ours only", func(t *testing.T, _ *netnstest.NS) tables {
				ts := tables{}
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
			{"foreign matches and targets", func(t *testing.T, ns *netnstest.NS) tables {
				ts := foreignRules(t, ns, f)
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
			{"1000 foreign rules", func(t *testing.T, _ *netnstest.NS) tables {
				ts := tables{}
				ts.manyRules(f, "filter", 1000)
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
			{"50000 foreign rules", func(t *testing.T, _ *netnstest.NS) tables {
				ts := tables{}
				ts.manyRules(f, "filter", 50000)
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
		} {
			t.Run(f.String()+"/"+tc.name, func(t *testing.T) {
				ns := netnstest.New(t)
				ts := tc.build(t, ns)
				restore(t, ns, f, ts.text())
				s := open(t, ns, f)
				for _, table := range []string{"raw", "filter", "nat"} {
					if ts[table] == nil {
						continue
					}
					want := fromSave(save(t, ns, f, table))
					got := walkTable(t, s, table)
					if got.Unrecognised != "" {
						t.Fatalf("%s: not recognised: %s", table, got.Unrecognised)
					}
					if d := diffTables(want, got); d != "" {
						t.Errorf("%s: walk and iptables-legacy-save differ (-save +walk):\n%s", table, d)
					}
				}
			})
		}
	}
}

func walkTable(t testing.TB, s *Socket, table string) Table {
	t.Helper()
	var got Table
	err := s.Entries(table, func(in TableInfo, b []byte) error {
		var err error
		got, err = Walk(s.Family(), in, b, ours)
		return err
	})
	if err != nil {
		t.Fatalf("reading %s: %v", table, err)
	}
	return got
}

// rendered is the state of table where the ruleset is in place.
func rendered(rs *render.Ruleset, table string) Table {
	t := Table{Chains: map[string][]string{}, Jumps: map[string][]string{}}
	for _, tb := range rs.Tables {
		if tb.Name != table {
			continue
		}
		for _, c := range tb.Chains {
			t.Chains[c.Name] = c.Rules
			t.Jumps[c.Hook] = append(t.Jumps[c.Hook], c.JumpRule())
		}
	}
	return t
}

// drift is one way a table of ours may differ from the rendered one.
type drift struct {
	name string
	// canonical drifts leave rules in forms the walk renders.
	canonical bool
	apply     func(r *rand.Rand, ts tables, rs *render.Ruleset)
}

func ourChain(r *rand.Rand, rs *render.Ruleset) (string, render.Chain) {
	tb := rs.Tables[r.IntN(len(rs.Tables))]
	return tb.Name, tb.Chains[r.IntN(len(tb.Chains))]
}

func without(lines []string, drop func(string) bool) []string {
	return slices.DeleteFunc(lines, drop)
}

func alter(r *rand.Rand, ts tables, rs *render.Ruleset, change func(string) string) {
	table, c := ourChain(r, rs)
	rule := c.Rules[r.IntN(len(c.Rules))]
	for i, l := range ts[table].rules {
		if l == rule {
			ts[table].rules[i] = change(l)
			return
		}
	}
}

var drifts = []drift{
	{"none", true, func(*rand.Rand, tables, *render.Ruleset) {}},
	{"flushed chain", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts[table].rules = without(ts[table].rules, func(l string) bool { return strings.HasPrefix(l, "-A "+c.Name+" ") })
	}},
	{"deleted chain and jump", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts[table].rules = without(ts[table].rules, func(l string) bool {
			return strings.HasPrefix(l, "-A "+c.Name+" ") || l == c.JumpRule()
		})
		ts[table].decls = without(ts[table].decls, func(l string) bool { return strings.HasPrefix(l, ":"+c.Name+" ") })
	}},
	{"deleted jump", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts[table].rules = without(ts[table].rules, func(l string) bool { return l == c.JumpRule() })
	}},
	{"duplicate jump", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts.rule(table, c.JumpRule())
	}},
	{"extra rule", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		addr := "10.9.9.9/32"
		if rs.Family == render.IPv6 {
			addr = "fd00:9::9/128"
		}
		ts.rule(table, "-A "+c.Name+" -d "+addr+" -p tcp -m tcp --dport 443 -j ACCEPT")
	}},
	{"altered port", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string { return strings.Replace(l, "port 443", "port 444", 1) })
	}},
	{"altered port range", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string { return strings.Replace(l, "port 443", "port 443:444", 1) })
	}},
	{"altered verdict", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string {
			return strings.NewReplacer("-j ACCEPT", "-j DROP", "-j NOTRACK", "-j RETURN").Replace(l)
		})
	}},
	{"altered prefix", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string {
			if rs.Family == render.IPv6 {
				return strings.Replace(l, "/128", "/127", 1)
			}
			return strings.Replace(l, "/32", "/31", 1)
		})
	}},
	{"source for destination", true, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string { return strings.NewReplacer(" -d ", " -s ", " -s ", " -d ").Replace(l) })
	}},
	{"CT --notrack for NOTRACK", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		// CT is a target of the raw table only.
		alter(r, ts, rs, func(l string) string { return strings.Replace(l, "-j NOTRACK", "-j CT --notrack", 1) })
	}},
	{"rule with a comment", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string { return strings.Replace(l, " -j ", ` -m comment --comment "x y" -j `, 1) })
	}},
	{"rule on an interface", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string {
			if strings.Contains(l, "OUTPUT") { // -i is for input hooks, -o for output hooks
				return strings.Replace(l, " -p tcp", " -o lo -p tcp", 1)
			}
			return strings.Replace(l, " -p tcp", " -i lo -p tcp", 1)
		})
	}},
	{"inverted address", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		alter(r, ts, rs, func(l string) string {
			return strings.NewReplacer(" -d ", " ! -d ", " -s ", " ! -s ").Replace(l)
		})
	}},
	{"jump with a match", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts.rule(table, "-A "+c.Hook+" -p tcp -j "+c.Name)
	}},
	{"goto", false, func(r *rand.Rand, ts tables, rs *render.Ruleset) {
		table, c := ourChain(r, rs)
		ts.rule(table, "-A "+c.Hook+" -g "+c.Name)
	}},
}

// TestReaderProperty builds random tables (foreign rules, ours, and one
// drift) and checks that whenever the walk recognises a table it agrees
// with iptables-legacy-save, so that "recognised and converged" is
// exactly "the saved text equals the rendered rules"; and that drifts in
// forms the walk renders are recognised.
func TestReaderProperty(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-legacy-restore", "ip6tables-legacy-restore")
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 0))
	for _, f := range families() {
		ns := netnstest.New(t)
		s := open(t, ns, f)
		fallbacks := 0
		const rounds = 40
		for round := range rounds {
			ts := tables{}
			if r.IntN(2) == 0 {
				ts = foreignRules(t, ns, f)
			}
			if r.IntN(2) == 0 {
				ts.manyRules(f, "filter", r.IntN(200))
			}
			pool := addrs(f)
			rs := ts.addOurs(t, pool[:1+r.IntN(len(pool))]...)
			d := drifts[r.IntN(len(drifts))]
			d.apply(r, ts, rs)
			t.Logf("%s round %d: drift %q", f, round, d.name)
			restore(t, ns, f, ts.text())
			for _, table := range []string{"raw", "filter"} {
				text := save(t, ns, f, table)
				saved := fromSave(text)
				got := walkTable(t, s, table)
				want := rendered(rs, table)
				where := fmt.Sprintf("%s round %d, drift %q, table %s", f, round, d.name, table)
				if got.Unrecognised != "" {
					fallbacks++
					if d.canonical {
						t.Errorf("%s: not recognised: %s\n%s", where, got.Unrecognised, text)
					}
					continue
				}
				if diff := diffTables(saved, got); diff != "" {
					t.Errorf("%s: walk and iptables-legacy-save differ (-save +walk):\n%s", where, diff)
				}
				if conv, savedConv := diffTables(want, got) == "", diffTables(want, saved) == ""; conv != savedConv {
					t.Errorf("%s: converged by the walk %v, by the saved text %v", where, conv, savedConv)
				}
			}
		}
		t.Logf("%s: %d of %d tables left to iptables-legacy-save", f, fallbacks, 2*rounds)
	}
}

// TestInfoChanges proves what change detection relies on: each way of
// changing a table changes what IPT_SO_GET_INFO tells, and a rule
// replaced by one of the same size does not.
func TestInfoChanges(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-legacy-restore", "ip6tables-legacy-restore")
	for _, f := range families() {
		t.Run(f.String(), func(t *testing.T) {
			ns := netnstest.New(t)
			ts := foreignRules(t, ns, f)
			ts.addOurs(t, addrs(f)...)
			restore(t, ns, f, ts.text())
			s := open(t, ns, f)
			info := func() TableInfo {
				in, err := s.Info("filter")
				if err != nil {
					t.Fatal(err)
				}
				return in
			}
			prev := info()
			ipt := legacy(f, "")
			for _, op := range []struct {
				name    string
				args    []string
				changes bool
			}{
				{"add a rule", []string{"-I", "INPUT", "1", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "ACCEPT"}, true},
				{"replace it with one of the same size", []string{"-R", "INPUT", "1", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "DROP"}, false},
				{"delete a rule", []string{"-D", "INPUT", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "DROP"}, true},
				{"insert a rule", []string{"-I", "INPUT", "-j", "ACCEPT"}, true},
				{"delete our jump", []string{"-D", "INPUT", "-j", "APISERVER-PROXY-INPUT"}, true},
				{"flush our chain", []string{"-F", "APISERVER-PROXY-INPUT"}, true},
				{"create a chain", []string{"-N", "NEW-CHAIN"}, true},
				{"flush the table", []string{"-F"}, true},
				{"delete the user chains", []string{"-X"}, true},
				{"set a policy", []string{"-P", "INPUT", "DROP"}, false},
			} {
				ns.Run(t, ipt, append([]string{"-w", "-t", "filter"}, op.args...)...)
				got := info()
				if (got != prev) != op.changes {
					t.Errorf("%s: info changed %v, want %v (before %+v, after %+v)", op.name, got != prev, op.changes, prev, got)
				}
				prev = got
			}
		})
	}
}

// TestNoTableNotCreated: asking for a table the kernel does not list fails
// with ErrNoTable and does not create it.
func TestNoTableNotCreated(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-legacy-restore", "ip6tables-legacy-restore")
	for _, f := range families() {
		ns := netnstest.New(t)
		ts := tables{}
		ts.table("filter")
		restore(t, ns, f, ts.text())
		s := open(t, ns, f)
		for _, table := range []string{"security", "mangle"} {
			if _, err := s.Info(table); !errors.Is(err, ErrNoTable) {
				t.Errorf("%s %s: Info err = %v, want ErrNoTable", f, table, err)
			}
			if err := s.Entries(table, func(TableInfo, []byte) error { return nil }); !errors.Is(err, ErrNoTable) {
				t.Errorf("%s %s: Entries err = %v, want ErrNoTable", f, table, err)
			}
		}
		got, err := s.Tables()
		if err != nil {
			t.Fatal(err)
		}
		if got["security"] || got["mangle"] || !got["filter"] {
			t.Errorf("%s: tables after asking = %v, want filter and not security or mangle", f, got)
		}
	}
}

// TestEntriesNotKept reads a table of 50,000 rules and checks that neither
// the Go heap nor the process keeps its entries afterwards.
func TestEntriesNotKept(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-legacy-restore")
	ns := netnstest.New(t)
	ts := tables{}
	ts.manyRules(IPv4, "filter", 50000)
	ts.addOurs(t, addrs(IPv4)...)
	restore(t, ns, IPv4, ts.text())
	s := open(t, ns, IPv4)
	in, err := s.Info("filter")
	if err != nil {
		t.Fatal(err)
	}
	walkTable(t, s, "filter") // warm up
	before := rss(t)
	heapBefore := heapInUse()
	for range 3 {
		walkTable(t, s, "filter")
	}
	heapAfter := heapInUse()
	after := rss(t)
	t.Logf("entries %d bytes; RSS %d -> %d KiB; heap in use %d -> %d KiB", in.Size, before>>10, after>>10, heapBefore>>10, heapAfter>>10)
	if grow := after - before; grow > int64(in.Size)/4 {
		t.Errorf("RSS grew by %d KiB after reading %d KiB of entries", grow>>10, in.Size>>10)
	}
	if grow := heapAfter - heapBefore; grow > int64(in.Size)/8 {
		t.Errorf("heap grew by %d KiB after reading %d KiB of entries", grow>>10, in.Size>>10)
	}
}

// TestRecord records tables into testdata/ for the unit tests, with
// -record.
func TestRecord(t *testing.T) {
	if !*record {
		t.Skip("run with -record to record testdata/")
	}
	netnstest.RequireBinaries(t, "iptables-legacy-restore", "ip6tables-legacy-restore")
	for _, f := range families() {
		for _, tc := range []struct {
			name  string
			build func(t *testing.T, ns *netnstest.NS) tables
		}{
			{"empty", func(*testing.T, *netnstest.NS) tables {
				ts := tables{}
				ts.table("raw")
				ts.table("filter")
				return ts
			}},
			{"ours", func(t *testing.T, _ *netnstest.NS) tables {
				ts := tables{}
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
			{"foreign", func(t *testing.T, ns *netnstest.NS) tables {
				ts := foreignRules(t, ns, f)
				ts.addOurs(t, addrs(f)...)
				return ts
			}},
			{"drifted", func(t *testing.T, ns *netnstest.NS) tables {
				ts := foreignRules(t, ns, f)
				rs := ts.addOurs(t, addrs(f)...)
				c := rs.Tables[1].Chains[0]
				ts.rule("filter", "-A "+c.Hook+" -m comment --comment again -j "+c.Name)
				ts.rule("raw", "-A "+rs.Tables[0].Chains[0].Name+" -j CT --notrack")
				return ts
			}},
		} {
			ns := netnstest.New(t)
			ts := tc.build(t, ns)
			restore(t, ns, f, ts.text())
			s := open(t, ns, f)
			for _, table := range []string{"raw", "filter", "nat"} {
				if ts[table] == nil {
					continue
				}
				info, entries := readTable(t, s, table)
				rec := recorded{Family: f, Table: table, Info: info, Save: save(t, ns, f, table), Entries: entries}
				b, err := json.MarshalIndent(rec, "", "\t")
				if err != nil {
					t.Fatal(err)
				}
				name := filepath.Join("testdata", fmt.Sprintf("%s-%s-%s.json", strings.ToLower(f.String()), tc.name, table))
				if err := os.WriteFile(name, append(b, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}
