package apply

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netns"
	"k8s.io/klog/v2"
	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Rules keeps one address family's rendered ruleset in the kernel.
//
// It owns whole chains (render.ChainPrefix) and one jump to each from a
// built-in chain. It reads only those chains and the built-in chains it
// jumps from, and writes, when anything differs, one iptables-restore
// --noflush payload that rewrites the drifted chains (":CHAIN - [0:0]"
// empties and refills a chain in the same commit) and fixes the jumps. A
// line for a built-in chain is never written: under --noflush it would
// reset that chain's policy. Each table is its own transaction, so a failed
// restore leaves every table either as it was or as rendered.
//
// Rules is not safe for concurrent use; the sidecar syncs from one
// goroutine.
type Rules struct {
	run     runner
	want    Backend // as configured: nft, legacy or auto
	backend Backend // in use; "" until chosen by the first sync
	// otherClean is set once the backend not in use is known to hold
	// nothing of ours.
	otherClean bool
	ruleset    *render.Ruleset
	lockWait   time.Duration
	observer   Observer

	// verifiedStamp is what readStamp read at the start of the last sync
	// that found everything in place and wrote nothing, or of the last
	// read-back that found our write in place, at verifiedAt; zero
	// verifiedAt means there is none since the last write.
	verifiedStamp string
	verifiedAt    time.Time
	// legacySeen, if set, learns the legacy tables' info of every verified
	// stamp, for the poller (see LegacySeen).
	legacySeen *LegacySeen
}

// generationTrust bounds how long an unchanged nftables generation may
// stand in for reading our rules: a safety net against anything the
// generation does not cover (rules of ours appearing in the legacy
// backend, say).
const generationTrust = 10 * time.Minute

// legacyTrust bounds how long the unchanged info of the legacy tables may
// stand in for reading our rules. The info misses a rule replaced by one
// of exactly the same size (ours altered with iptables -R, say), so a sync
// reads at least this often: at every sync with the default 60 s interval,
// as if there were no info; a shorter interval skips reads in between. One
// read of a table of 50,000 rules costs about 100 ms of CPU, mostly the
// kernel's copying it out; the info costs microseconds.
const legacyTrust = time.Minute

// NewRules returns Rules that keep rs in place with the programs of
// backend b (BackendAuto: detected by the first sync), run through ex. Every
// iptables-restore and the backend choice are reported to o.
func NewRules(ex utilexec.Interface, b Backend, rs *render.Ruleset, o Observer) *Rules {
	return rulesOn(hostNode{exec: ex, nft: nfnl.Conn{NS: netns.None()}, xt: newXtablesReader(netns.None())}, b, rs, o)
}

// rulesOn returns Rules on node n.
func rulesOn(n node, b Backend, rs *render.Ruleset, o Observer) *Rules {
	return &Rules{
		run:      runner{node: n, timeout: defaultTimeout},
		want:     b,
		ruleset:  rs,
		lockWait: backend.LockWait,
		observer: o,
	}
}

// SetTimeout bounds each iptables program these rules run (default 30s).
func (r *Rules) SetTimeout(d time.Duration) { r.run.timeout = d }

// Family is the address family these rules are for.
func (r *Rules) Family() render.Family { return r.ruleset.Family }

// Backend is the backend in use, or "" before the first sync chose it.
func (r *Rules) Backend() Backend { return r.backend }

// Drift is one difference between the kernel and the rendered ruleset.
type Drift struct {
	Table string
	// Object is "chain" (our chain's rules) or "jump" (a rule in a
	// built-in chain that jumps to our chain).
	Object string
	Chain  string
	What   string
}

func (d Drift) String() string {
	return fmt.Sprintf("%s %s %s: %s", d.Table, d.Object, d.Chain, d.What)
}

// Sync compares the kernel's state of our chains and jumps with the
// rendered ruleset and, if anything differs, rewrites what differs in one
// iptables-restore. It returns what differed. When nothing differs it runs
// nothing but the reads, which are in-process where the rules are in the
// form we write them. When the stamp of the backend in use (the nftables
// generation; the legacy tables' info) has not changed since a sync found
// everything in place, it does not even read (for at most generationTrust;
// legacyTrust).
//
// The first sync chooses the backend (detecting it with BackendAuto) and
// checks that its programs exist; after its write it removes anything of
// ours from the other backend, so that a node never carries both. With
// BackendAuto, a sync that finds none of our chains in the backend in use
// while the other backend holds some detects the backend again.
func (r *Rules) Sync(ctx context.Context) ([]Drift, error) {
	first := r.backend == ""
	if first {
		if err := r.choose(ctx); err != nil {
			return nil, err
		}
	}
	st, stampOK := r.readStamp()
	if stampOK && !r.verifiedAt.IsZero() && st.key == r.verifiedStamp && time.Since(r.verifiedAt) < st.trust {
		r.observer.VerificationSkipped(st.reason)
		return nil, nil
	}
	r.verifiedAt = time.Time{}
	started := time.Now()
	states, err := r.readAll(ctx, r.backend)
	if err != nil {
		return nil, err
	}
	if !first && r.want == BackendAuto && noneOfOurs(states) {
		// Whoever put our chains into the other backend (a previous run,
		// an operator) may know that the host changed backends.
		moved, err := r.oursIn(ctx, other(r.backend))
		if err != nil {
			// Not knowing is no reason to switch, nor to fail a sync that
			// can still write our rules where they belong.
			klog.InfoS("Cannot read the iptables backend not in use; keeping the one in use",
				"family", r.ruleset.Family, "inUse", r.backend, "other", other(r.backend), "err", err)
		}
		if err == nil && moved {
			klog.InfoS("Our chains are gone from the iptables backend in use but present in the other; detecting the backend again",
				"family", r.ruleset.Family, "inUse", r.backend, "other", other(r.backend))
			if err := r.choose(ctx); err != nil {
				return nil, err
			}
			if states, err = r.readAll(ctx, r.backend); err != nil {
				return nil, err
			}
		}
	}

	var payload []string
	var drifts []Drift
	for i, t := range r.ruleset.Tables {
		lines, d := repair(t, states[i])
		payload = append(payload, lines...)
		drifts = append(drifts, d...)
	}
	if len(payload) > 0 {
		if err := r.restore(ctx, r.backend, payload); err != nil {
			return drifts, err
		}
		if err := r.readBack(ctx); err != nil {
			return drifts, err
		}
	}
	if !r.otherClean {
		gone, err := r.cleanupIn(ctx, other(r.backend))
		if err != nil {
			return drifts, fmt.Errorf("removing our rules from the %s backend: %w", other(r.backend), err)
		}
		for _, g := range gone {
			klog.InfoS("Removed our rules from the iptables backend not in use", "family", r.ruleset.Family, "removed", g.String())
		}
		r.otherClean = true
	}
	if stampOK && len(payload) == 0 {
		// Everything was in place when the stamp was read: until it
		// changes, it still is.
		r.verified(st, started)
	}
	return drifts, nil
}

// readBack reads our chains and jumps again right after a write and
// returns an error if they still differ from the rendered ruleset: an
// iptables-restore that exits 0 without loading its input (a broken or
// substituted program), or another writer changing our chains at the same
// moment, would otherwise pass for a repair. It writes nothing; the next
// sync does. A read-back that finds everything in place records the
// stamp, so the event (or, with legacy, the change of info) our own write
// caused costs no read.
func (r *Rules) readBack(ctx context.Context) error {
	st, stampOK := r.readStamp()
	started := time.Now()
	states, err := r.readAll(ctx, r.backend)
	if err != nil {
		return fmt.Errorf("reading back after %s: %w", program(r.backend, r.ruleset.Family, backend.Restore), err)
	}
	var still []string
	for i, t := range r.ruleset.Tables {
		_, d := repair(t, states[i])
		for _, x := range d {
			still = append(still, x.String())
		}
	}
	if len(still) > 0 {
		return fmt.Errorf("rules still differ right after %s succeeded (it did not load them, or another writer changed them meanwhile): %s",
			program(r.backend, r.ruleset.Family, backend.Restore), strings.Join(still, "; "))
	}
	if stampOK {
		r.verified(st, started)
	}
	return nil
}

// verified records that our rules were in place under st, read at at.
func (r *Rules) verified(st stamp, at time.Time) {
	r.verifiedStamp, r.verifiedAt = st.key, at
	for i, t := range r.ruleset.Tables {
		if i < len(st.legacy) {
			r.legacySeen.record(r.ruleset.Family, t.Name, st.legacy[i])
		}
	}
}

// SetLegacySeen makes every sync that finds our legacy rules in place, or
// puts them there, tell l the tables' info it found them under.
func (r *Rules) SetLegacySeen(l *LegacySeen) { r.legacySeen = l }

// stamp is what readStamp reads.
type stamp struct {
	// key changes whenever the backend in use changes our rules.
	key string
	// reason is what a sync skipped on the stamp reports.
	reason SkipReason
	// trust is how long an unchanged key may stand in for reading.
	trust time.Duration
	// legacy is the info of each of the ruleset's tables, with legacy.
	legacy []xtables.TableInfo
}

// readStamp reads, in microseconds, what changes whenever the backend in
// use changes our rules: with nft the nftables generation, which every
// commit moves; with legacy the info (entry count, size, chain offsets) of
// each table we use, which every rule added, deleted or resized changes.
// ok is false where there is none to read.
func (r *Rules) readStamp() (st stamp, ok bool) {
	switch r.backend {
	case BackendNFT:
		gen, err := r.run.node.generation()
		if err != nil {
			klog.V(2).InfoS("Cannot read the nftables generation; reading the rules", "err", err)
			return stamp{}, false
		}
		return stamp{key: strconv.FormatUint(uint64(gen), 10), reason: SkipGenerationUnchanged, trust: generationTrust}, true
	case BackendLegacy:
		st := stamp{reason: SkipLegacyUnchanged, trust: legacyTrust}
		var b strings.Builder
		for _, t := range r.ruleset.Tables {
			in, err := r.run.node.legacyInfo(r.ruleset.Family, t.Name)
			if err != nil {
				klog.V(2).InfoS("Cannot read the legacy tables' info; reading the rules", "family", r.ruleset.Family, "table", t.Name, "err", err)
				return stamp{}, false
			}
			fmt.Fprintf(&b, "%s %+v\n", t.Name, in)
			st.legacy = append(st.legacy, in)
		}
		st.key = b.String()
		return st, true
	}
	return stamp{}, false
}

// choose settles the backend: the configured one, or the detected one.
func (r *Rules) choose(ctx context.Context) error {
	b := r.want
	if b == BackendAuto {
		d, err := r.run.Detect(ctx, r.ruleset.Family)
		if err != nil {
			return fmt.Errorf("detecting the iptables backend: %w", err)
		}
		klog.InfoS("Chose iptables backend", "family", r.ruleset.Family, "backend", d.Backend, "evidence", d.Evidence)
		b = d.Backend
	}
	if err := r.run.lookPath(b, r.ruleset.Family); err != nil {
		return err
	}
	r.backend, r.otherClean = b, false
	r.observer.BackendChosen(r.ruleset.Family, b)
	return nil
}

// readAll reads each table of the ruleset from backend b.
func (r *Rules) readAll(ctx context.Context, b Backend) ([]tableState, error) {
	states := make([]tableState, len(r.ruleset.Tables))
	for i, t := range r.ruleset.Tables {
		st, err := r.read(ctx, b, t)
		if err != nil {
			return nil, err
		}
		states[i] = st
	}
	return states, nil
}

func noneOfOurs(states []tableState) bool {
	for _, st := range states {
		if len(st.chains) > 0 {
			return false
		}
	}
	return true
}

// oursIn reports whether backend b holds any chain of ours. A backend whose
// programs are missing holds none.
func (r *Rules) oursIn(ctx context.Context, b Backend) (bool, error) {
	if r.run.lookPath(b, r.ruleset.Family) != nil {
		return false, nil
	}
	states, err := r.readAll(ctx, b)
	return err == nil && !noneOfOurs(states), err
}

// Cleanup removes our jumps and chains from both backends, and nothing
// else. A backend whose programs are missing holds nothing of ours (we
// could not have written there). It writes nothing where nothing of ours
// exists.
func (r *Rules) Cleanup(ctx context.Context) ([]Removal, error) {
	var removed []Removal
	var errs []error
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		gone, err := r.cleanupIn(ctx, b)
		removed = append(removed, gone...)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s backend: %w", b, err))
		}
	}
	return removed, errors.Join(errs...)
}

// Removal is one chain of ours, or one rule jumping to it, that Cleanup
// removed.
type Removal struct {
	Backend Backend
	Table   string
	// Object is "chain" or "jump".
	Object string
	// Chain is our chain; for a jump, Hook is the built-in chain it was in.
	Chain, Hook string
}

// String returns "nft raw chain APISERVER-PROXY-OUTPUT" or "nft raw jump
// to APISERVER-PROXY-OUTPUT from OUTPUT".
func (m Removal) String() string {
	if m.Object == "jump" {
		return fmt.Sprintf("%s %s jump to %s from %s", m.Backend, m.Table, m.Chain, m.Hook)
	}
	return fmt.Sprintf("%s %s chain %s", m.Backend, m.Table, m.Chain)
}

func (r *Rules) cleanupIn(ctx context.Context, b Backend) ([]Removal, error) {
	if r.run.lookPath(b, r.ruleset.Family) != nil {
		return nil, nil
	}
	states, err := r.readAll(ctx, b)
	if err != nil {
		return nil, err
	}
	var payload []string
	var removed []Removal
	for i, t := range r.ruleset.Tables {
		lines, gone := teardown(t, states[i])
		payload = append(payload, lines...)
		for _, g := range gone {
			g.Backend = b
			removed = append(removed, g)
		}
	}
	if len(payload) == 0 {
		return nil, nil
	}
	if err := r.restore(ctx, b, payload); err != nil {
		return nil, err
	}
	return removed, nil
}

// tableState is what one table holds of ours.
type tableState struct {
	// chains maps each of our chains that exists to its rules as listed.
	chains map[string][]string
	// refs maps each built-in chain we jump from to its rules that target
	// one of our chains: normally just our jump.
	refs map[string][]string
}

// read lists our chains and the built-in chains we jump from in table t.
//
// What a read costs differs by backend (measured with 50,000 foreign rules;
// see the README):
//   - nft: iptables-nft-save and a whole-table -S read the whole table or
//     ruleset from the kernel, about a second and 70 MB on a large node,
//     whatever -t says; "-t TABLE -S CHAIN" fetches one chain but still
//     costs a process. So we ask the kernel over nfnetlink for our chains
//     and the built-in chains we jump from, one by one, in-process, and
//     recognise what we wrote (readChainNFT, bareJumps). Only what we do
//     not recognise is listed with "-t TABLE -S CHAIN", as text.
//   - legacy: the kernel hands over a whole table on every read, so listing
//     one chain costs as much as the table, and iptables-legacy -S takes the
//     xtables lock. So we read each table once, in-process
//     (IPT_SO_GET_ENTRIES, internal/xtables), into memory mapped for that
//     read only, and recognise what we wrote (readLegacy). Only a table
//     where a rule of ours, or a rule jumping to ours, is in another form
//     is read with iptables-legacy-save -t TABLE (which takes no lock),
//     keeping only the lines that concern us, streaming. A table
//     /proc/net/ip_tables_names does not list is not read at all: it holds
//     nothing, and reading it would create it.
func (r *Rules) read(ctx context.Context, b Backend, t render.Table) (tableState, error) {
	st := tableState{chains: map[string][]string{}, refs: map[string][]string{}}
	keep, collect := st.collector(t)
	f := r.ruleset.Family
	if b == BackendLegacy {
		// A table the kernel does not list holds nothing, and reading it
		// would create it.
		tables, err := r.run.legacyTables(f)
		if err != nil || !tables[t.Name] {
			return st, err
		}
		if r.readLegacy(t, collect) {
			return st, nil
		}
		return st, r.run.runKeep(ctx, nil, tableListing(t.Name), keep, collect, program(b, f, backend.Save), "-t", t.Name)
	}
	list := program(b, f, backend.IPTables)
	for _, c := range t.Chains {
		known, err := r.readChainNFT(t, c, collect)
		if err != nil {
			return st, err
		}
		if known {
			continue
		}
		err = r.run.run(ctx, nil, chainListing(c.Name), collect, list, "-t", t.Name, "-S", c.Name)
		if err != nil && !isChainNotFound(err) {
			return st, err
		}
	}
	for _, hook := range hooks(t) {
		bare, err := r.bareJumps(t, hook)
		if err != nil {
			return st, err
		}
		if bare != nil {
			for _, rule := range bare {
				collect(rule)
			}
			continue
		}
		if err := r.run.run(ctx, nil, chainListing(hook), collect, list, "-t", t.Name, "-S", hook); err != nil {
			return st, err
		}
	}
	return st, nil
}

// readLegacy reads legacy table t in-process and, when every rule of our
// chains and every rule jumping to them is in a form xtables renders,
// hands collect the lines iptables-legacy-save would print of them and
// returns true. Otherwise, or when the read fails, it returns false: then
// iptables-legacy-save, which knows every match and target, is the judge.
func (r *Rules) readLegacy(t render.Table, collect func(string)) bool {
	ours := map[string]bool{}
	for _, c := range t.Chains {
		ours[c.Name] = true
	}
	f := r.ruleset.Family
	got, err := r.run.node.legacyRead(f, t.Name, func(chain string) bool { return ours[chain] })
	if err != nil {
		klog.V(2).InfoS("Cannot read the legacy table in-process; asking iptables-legacy-save", "family", f, "table", t.Name, "err", err)
		return false
	}
	if got.Unrecognised != "" {
		klog.V(2).InfoS("A rule in the legacy table is not in the form we write; asking iptables-legacy-save", "family", f, "table", t.Name, "rule", got.Unrecognised)
		return false
	}
	for _, c := range t.Chains {
		rules, ok := got.Chains[c.Name]
		if !ok {
			continue
		}
		collect(":" + c.Name + " - [0:0]")
		for _, rule := range rules {
			collect(rule)
		}
	}
	for _, hook := range hooks(t) {
		for _, rule := range got.Jumps[hook] {
			collect(rule)
		}
	}
	return true
}

// readChainNFT reads our chain c in-process and, when it is missing, empty
// or holds exactly our rendered rules, hands collect the lines `iptables
// -S` would print for it and returns true. Otherwise (some rule differs, or
// is stored in a form wantExprs does not know) it returns false: only
// iptables-nft can tell what the rules are then.
func (r *Rules) readChainNFT(t render.Table, c render.Chain, collect func(string)) (bool, error) {
	f := r.ruleset.Family
	got, err := r.run.node.exprs(f, t.Name, c.Name)
	if err != nil {
		return false, err
	}
	if len(got) == 0 {
		exists, err := r.run.node.hasChain(f, t.Name, c.Name)
		if err != nil || !exists {
			return !exists, err
		}
	}
	if len(got) != len(c.Rules) && len(got) != 0 {
		return false, nil
	}
	for i, exprs := range got {
		want, ok := wantExprs(f, c.Rules[i])
		if !ok || !slices.Equal(want, exprs) {
			return false, nil
		}
	}
	collect("-N " + c.Name)
	if len(got) > 0 {
		for _, rule := range c.Rules {
			collect(rule)
		}
	}
	return true, nil
}

// bareJumps reads built-in chain hook of table t in-process and returns
// its rules that target our chains as `iptables -S` prints them, when each
// of them is a plain jump ("-A HOOK -j CHAIN"): the only form we write. It
// returns nil when any rule targeting our chains has another form; only
// iptables-nft can print that one as text, for repair to delete it.
func (r *Rules) bareJumps(t render.Table, hook string) ([]string, error) {
	ours := map[string]bool{}
	for _, c := range t.Chains {
		ours[c.Name] = true
	}
	jumps, _, err := r.run.node.jumps(r.ruleset.Family, t.Name, hook)
	if err != nil {
		return nil, err
	}
	lines := []string{}
	for _, j := range jumps {
		if !ours[j.Target] {
			continue
		}
		if !j.Bare {
			return nil, nil
		}
		lines = append(lines, "-A "+hook+" -j "+j.Target)
	}
	return lines, nil
}

// collector returns collect, which takes one line of `iptables -S` or
// `iptables-save` output and keeps what concerns t's chains, and keep, a
// test on a line's bytes that passes every line collect may keep: chain
// declarations and rules of our chains and the built-in chains we jump
// from. keep lets a reader skip the rest of a large table without copying
// it.
func (st tableState) collector(t render.Table) (keep func([]byte) bool, collect func(string)) {
	ours := map[string]bool{}
	isHook := map[string]bool{}
	for _, c := range t.Chains {
		ours[c.Name] = true
		isHook[c.Hook] = true
	}
	keep = func(line []byte) bool {
		rest, ok := bytes.CutPrefix(line, []byte("-A "))
		if !ok {
			return true // declarations, headers: few
		}
		chain, _, _ := bytes.Cut(rest, []byte(" "))
		return ours[string(chain)] || isHook[string(chain)]
	}
	return keep, func(line string) {
		switch {
		case strings.HasPrefix(line, "-A "):
			chain, _, _ := strings.Cut(line[3:], " ")
			if ours[chain] {
				st.chains[chain] = append(st.chains[chain], line)
			} else if isHook[chain] && ours[target(line)] {
				st.refs[chain] = append(st.refs[chain], line)
			}
		case strings.HasPrefix(line, "-N "): // iptables -S
			if chain := line[3:]; ours[chain] && st.chains[chain] == nil {
				st.chains[chain] = []string{}
			}
		case strings.HasPrefix(line, ":"): // iptables-save
			if chain, _, _ := strings.Cut(line[1:], " "); ours[chain] && st.chains[chain] == nil {
				st.chains[chain] = []string{}
			}
		}
	}
}

// target returns the chain a rule jumps or goes to, or "".
func target(rule string) string {
	f := strings.Fields(rule)
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return ""
}

// hooks returns the built-in chains t jumps from, in order.
func hooks(t render.Table) []string {
	var out []string
	for _, c := range t.Chains {
		if !slices.Contains(out, c.Hook) {
			out = append(out, c.Hook)
		}
	}
	return out
}

// repair returns the restore lines that bring table t from st to the
// rendered state, and what differed. It returns no lines when nothing did.
//
// A chain that is missing or whose rules differ in any way is rewritten
// whole. A missing jump is inserted at the top of its built-in chain. A
// jump found more than once is deleted everywhere and inserted once at the
// top. Any other rule in a built-in chain that targets our chain (an
// altered jump) is deleted. A jump that exists once is left where it is,
// even below rules others inserted later: other agents (kube-proxy among
// them) also insert their jumps at the top and check only that they exist,
// so insisting on the first position would make the two fight forever.
func repair(t render.Table, st tableState) ([]string, []Drift) {
	var decl, del, add, ins []string
	var drifts []Drift
	for _, c := range t.Chains {
		got, ok := st.chains[c.Name]
		what := ""
		switch {
		case !ok:
			what = "missing"
		case !slices.Equal(got, c.Rules):
			what = fmt.Sprintf("rules differ (%d listed, %d rendered)", len(got), len(c.Rules))
		default:
			continue
		}
		drifts = append(drifts, Drift{Table: t.Name, Object: "chain", Chain: c.Name, What: what})
		decl = append(decl, declare(c.Name))
		add = append(add, c.Rules...)
	}
	for _, c := range t.Chains {
		jump := ruleSpec{chain: c.Hook, spec: c.JumpSpec()}
		n := 0
		for _, rule := range st.refs[c.Hook] {
			switch {
			case rule == jump.appendLine():
				n++
			case target(rule) == c.Name:
				drifts = append(drifts, Drift{Table: t.Name, Object: "jump", Chain: c.Name, What: "unexpected rule " + strconv.Quote(rule)})
				del = append(del, listed(rule).deleteLine())
			}
		}
		switch {
		case n == 1:
			continue
		case n == 0:
			drifts = append(drifts, Drift{Table: t.Name, Object: "jump", Chain: c.Name, What: "missing from " + c.Hook})
		default:
			drifts = append(drifts, Drift{Table: t.Name, Object: "jump", Chain: c.Name, What: fmt.Sprintf("%d copies in %s", n, c.Hook)})
			for range n {
				del = append(del, jump.deleteLine())
			}
		}
		ins = append(ins, jump.insertLine())
	}
	return block(t.Name, decl, del, add, ins), drifts
}

// teardown returns the restore lines that remove our chains and every rule
// in a built-in chain that targets them from table t, and what they
// remove.
func teardown(t render.Table, st tableState) ([]string, []Removal) {
	var flush, del, drop []string
	var removed []Removal
	for _, c := range t.Chains {
		if _, ok := st.chains[c.Name]; ok {
			flush = append(flush, declare(c.Name))
			drop = append(drop, "-X "+c.Name)
			removed = append(removed, Removal{Table: t.Name, Object: "chain", Chain: c.Name})
		}
	}
	for _, h := range hooks(t) {
		for _, rule := range st.refs[h] {
			del = append(del, listed(rule).deleteLine())
			removed = append(removed, Removal{Table: t.Name, Object: "jump", Chain: target(rule), Hook: h})
		}
	}
	return block(t.Name, flush, del, drop), removed
}

// ruleSpec is one rule: the chain it is in and the rest of it, as
// `iptables -S` prints it after the chain ("-j APISERVER-PROXY-INPUT").
type ruleSpec struct {
	chain, spec string
}

// listed returns the ruleSpec of a rule as `iptables -S` or iptables-save
// lists it: "-A CHAIN SPEC".
func listed(rule string) ruleSpec {
	rest, _ := strings.CutPrefix(rule, "-A ")
	chain, spec, _ := strings.Cut(rest, " ")
	return ruleSpec{chain: chain, spec: spec}
}

// appendLine, insertLine and deleteLine return the restore line that
// appends the rule to its chain, inserts it at the top, or deletes it.
func (s ruleSpec) appendLine() string { return s.line("-A") }
func (s ruleSpec) insertLine() string { return s.line("-I") }
func (s ruleSpec) deleteLine() string { return s.line("-D") }

func (s ruleSpec) line(op string) string {
	if s.spec == "" {
		return op + " " + s.chain
	}
	return op + " " + s.chain + " " + s.spec
}

// declare is the restore line that creates chain, or empties it if it
// exists, in the same commit.
func declare(chain string) string { return ":" + chain + " - [0:0]" }

// block wraps the lines in a table's *TABLE ... COMMIT, or returns nil if
// there are none.
func block(table string, parts ...[]string) []string {
	var lines []string
	for _, p := range parts {
		lines = append(lines, p...)
	}
	if len(lines) == 0 {
		return nil
	}
	return append(append([]string{"*" + table}, lines...), "COMMIT")
}

// restore loads lines with one iptables-restore --noflush of backend b.
func (r *Rules) restore(ctx context.Context, b Backend, lines []string) error {
	payload := []byte(strings.Join(lines, "\n") + "\n")
	name := program(b, r.ruleset.Family, backend.Restore)
	wait := "--wait=" + strconv.Itoa(int(r.lockWait.Seconds()))
	err := r.run.run(ctx, payload, noCheck, discard, name, "--noflush", wait)
	r.observer.RestoreRan(r.ruleset.Family, err)
	return err
}
