package xtables

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// ours is what the sidecar looks for: its own chains.
func ours(chain string) bool { return strings.HasPrefix(chain, render.ChainPrefix) }

// legacy names iptables-legacy program tool ("restore", "save", "") of f.
func legacy(f Family, tool string) string {
	name := "iptables-legacy"
	if f == IPv6 {
		name = "ip6tables-legacy"
	}
	if tool != "" {
		name += "-" + tool
	}
	return name
}

// restore loads text with iptables-legacy-restore (without --noflush: the
// tables named are replaced whole).
func restore(t testing.TB, ns *netnstest.NS, f Family, text string) {
	t.Helper()
	c := ns.Command(legacy(f, "restore"))
	c.Stdin = strings.NewReader(text)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s\ninput:\n%s", legacy(f, "restore"), err, out, head(text))
	}
}

func head(text string) string {
	lines := strings.SplitN(text, "\n", 40)
	return strings.Join(lines[:min(len(lines), 39)], "\n")
}

// save returns iptables-legacy-save's text of table.
func save(t testing.TB, ns *netnstest.NS, f Family, table string) string {
	t.Helper()
	return ns.Run(t, legacy(f, "save"), "-t", table)
}

// fromSave is what iptables-legacy-save's text says of our chains and the
// jumps to them from built-in chains: the judge the walk must agree with.
func fromSave(text string) Table {
	t := Table{Chains: map[string][]string{}, Jumps: map[string][]string{}}
	for line := range strings.SplitSeq(text, "\n") {
		switch {
		case strings.HasPrefix(line, ":"):
			if name, _, _ := strings.Cut(line[1:], " "); ours(name) {
				t.Chains[name] = []string{}
			}
		case strings.HasPrefix(line, "-A "):
			chain, _, _ := strings.Cut(line[3:], " ")
			if ours(chain) {
				t.Chains[chain] = append(t.Chains[chain], line)
			} else if slices.Contains(hookNames[:], chain) && ours(jumpTarget(line)) {
				t.Jumps[chain] = append(t.Jumps[chain], line)
			}
		}
	}
	return t
}

// jumpTarget returns the chain a rule jumps or goes to, or "".
func jumpTarget(rule string) string {
	f := strings.Fields(rule)
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return ""
}

func diffTables(want, got Table) string {
	return cmp.Diff(want, got, cmpopts.EquateEmpty())
}

// readTable returns table's info and a copy of its entries.
func readTable(t testing.TB, s *Socket, table string) (TableInfo, []byte) {
	t.Helper()
	var info TableInfo
	var entries []byte
	err := s.Entries(table, func(in TableInfo, b []byte) error {
		info, entries = in, slices.Clone(b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return info, entries
}

func open(t testing.TB, ns *netnstest.NS, f Family) *Socket {
	t.Helper()
	s, err := Open(ns.NetNS(t), f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// recorded is one table read from a namespace, kept in testdata/.
type recorded struct {
	Family  Family
	Table   string
	Info    TableInfo
	Save    string
	Entries []byte
}

func loadRecorded(t testing.TB, name string) recorded {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var r recorded
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	return r
}
