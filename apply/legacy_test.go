package apply

import (
	"context"
	"errors"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// fakeLegacy is a legacyReader over fixed answers by table: what a read
// finds (or its error), and the info.
type fakeLegacy struct {
	tables map[string]xtables.Table
	errs   map[string]error
	infos  map[string]xtables.TableInfo
	reads  int
}

func (f *fakeLegacy) read(_ render.Family, table string, ours func(string) bool) (xtables.Table, error) {
	f.reads++
	if err := f.errs[table]; err != nil {
		return xtables.Table{}, err
	}
	t := f.tables[table]
	for c := range t.Chains {
		if !ours(c) {
			panic("the fake holds a chain the read does not look for: " + c)
		}
	}
	return t, nil
}

func (f *fakeLegacy) info(_ render.Family, table string) (xtables.TableInfo, error) {
	return f.infos[table], nil
}

// inPlace is what an in-process read of a legacy node where rs is in
// place finds.
func inPlace(rs *render.Ruleset) map[string]xtables.Table {
	out := map[string]xtables.Table{}
	for _, tb := range rs.Tables {
		t := xtables.Table{Chains: map[string][]string{}, Jumps: map[string][]string{}}
		for _, c := range tb.Chains {
			t.Chains[c.Name] = c.Rules
			t.Jumps[c.Hook] = append(t.Jumps[c.Hook], c.JumpRule())
		}
		out[tb.Name] = t
	}
	return out
}

var legacyTables = map[string]string{ipTablesNames: "filter\nraw\n"}

func TestRulesLegacyInProcess(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	// 1: read in-process, converged; then the nft backend is looked at
	// once. 2: same info, skipped. 3: info changed, read again: a jump is
	// gone, written with iptables-legacy-restore, read back in-process.
	fake := &fakeLegacy{tables: inPlace(rs), infos: map[string]xtables.TableInfo{"raw": {Size: 1}, "filter": {Size: 2}}}
	calls := noneOfOursNFT("iptables-nft")
	calls = append(calls, call{argv: "iptables-legacy-restore --noflush --wait=5", stdin: "*filter\n-I INPUT -j APISERVER-PROXY-INPUT\nCOMMIT\n",
		run: func() { fake.tables = inPlace(rs) }})
	r, stats := newRules(t, BackendLegacy, rs, legacyTables, calls...)
	r.run.legacy = fake
	ctx := context.Background()
	for i := range 2 {
		if drifts, err := r.Sync(ctx); err != nil || len(drifts) != 0 {
			t.Fatalf("sync %d: drifts %v, error %v", i+1, drifts, err)
		}
	}
	if got := stats.Skipped.Load(); got != 1 || fake.reads != 2 {
		t.Fatalf("%d syncs skipped and %d tables read, want 1 and 2", got, fake.reads)
	}
	filter := fake.tables["filter"]
	filter.Jumps = map[string][]string{"OUTPUT": {"-A OUTPUT -j APISERVER-PROXY-OUTPUT"}}
	fake.tables["filter"] = filter
	fake.infos["filter"] = xtables.TableInfo{Size: 3}
	drifts, err := r.Sync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := driftStrings(drifts); len(got) != 1 || got[0] != "filter jump APISERVER-PROXY-INPUT: missing from INPUT" {
		t.Errorf("drifts %v, want the INPUT jump missing", got)
	}
}

func TestRulesLegacyFallsBackToSave(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	for _, tc := range []struct {
		name string
		raw  xtables.Table
		err  error
	}{
		{"a rule not in our form", xtables.Table{Unrecognised: "rule 1 of chain APISERVER-PROXY-OUTPUT: match comment revision 0"}, nil},
		{"the read fails", xtables.Table{}, errors.New("getting the entries of IPv4 table raw: operation not permitted")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tables := inPlace(rs)
			tables["raw"] = tc.raw
			fake := &fakeLegacy{tables: tables, errs: map[string]error{"raw": tc.err}}
			// Only raw is asked of iptables-legacy-save.
			calls := append([]call{legacyConverged()[0]}, noneOfOursNFT("iptables-nft")...)
			r, _ := newRules(t, BackendLegacy, rs, legacyTables, calls...)
			r.run.legacy = fake
			if drifts, err := r.Sync(context.Background()); err != nil || len(drifts) != 0 {
				t.Fatalf("drifts %v, error %v", drifts, err)
			}
		})
	}
}

func TestLegacyChangeConcernsOnlyLegacy(t *testing.T) {
	if got := scopeOf(TriggerLegacyChange); got != (scope{rules: true}) {
		t.Errorf("scope of %s = %v, want rules only", TriggerLegacyChange, got)
	}
}
