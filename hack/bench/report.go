package main

import (
	"fmt"
	"strings"
	"time"
)

// row is one line of the results table.
type row struct {
	Scenario, Figure         string
	Ours, PerRule, Save      string
	OursPerRule, OursPerSave string
}

// markdownTable formats rows as one markdown table.
func markdownTable(rows []row) string {
	var b strings.Builder
	b.WriteString("| scenario | figure | ours | per-rule check | save and compare | ours ÷ per-rule | ours ÷ save |\n")
	b.WriteString("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
	cell := func(s string) string {
		if s == "" {
			return "—"
		}
		return strings.ReplaceAll(s, "|", `\|`)
	}
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n",
			cell(r.Scenario), cell(r.Figure), cell(r.Ours), cell(r.PerRule), cell(r.Save), cell(r.OursPerRule), cell(r.OursPerSave))
	}
	return b.String()
}

// fmtDur prints a duration with three significant digits or so.
func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "?"
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	case d < time.Second:
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
}

func fmtMiB(kb uint64) string { return fmt.Sprintf("%.1f MiB", float64(kb)/1024) }

// ratio prints a / b, or "" where it makes no sense.
func ratio(a, b float64) string {
	if b <= 0 || a < 0 {
		return ""
	}
	return fmt.Sprintf("%.2f×", a/b)
}

func fmtProcs(p float64) string {
	if p < 0 {
		return "?"
	}
	if p == float64(int(p)) {
		return fmt.Sprintf("%d", int(p))
	}
	return fmt.Sprintf("%.2f", p)
}

// rowsFor turns one scenario's results into table rows.
func rowsFor(r scenarioResult) []row {
	sc := r.Scenario.String()
	res := r.Results
	var rows []row
	add := func(fig string, vals [3]float64, show func(float64) string, withRatio bool) {
		rw := row{Scenario: sc, Figure: fig, Ours: show(vals[0]), PerRule: show(vals[1]), Save: show(vals[2])}
		if withRatio {
			rw.OursPerRule, rw.OursPerSave = ratio(vals[0], vals[1]), ratio(vals[0], vals[2])
		}
		rows = append(rows, rw)
	}
	dur := func(v float64) string { return fmtDur(time.Duration(v)) }
	mem := func(v float64) string { return fmtMiB(uint64(v)) }
	each := func(f func(contenderResult) float64) [3]float64 {
		return [3]float64{f(res[0]), f(res[1]), f(res[2])}
	}
	for _, k := range []struct {
		name string
		get  func(contenderResult) oneShot
	}{
		{"one-shot converged", func(c contenderResult) oneShot { return c.Converged }},
		{"fresh apply", func(c contenderResult) oneShot { return c.Fresh }},
	} {
		add(k.name+": wall", each(func(c contenderResult) float64 { return float64(k.get(c).Wall) }), dur, true)
		add(k.name+": CPU", each(func(c contenderResult) float64 { return float64(k.get(c).CPU) }), dur, true)
		add(k.name+": peak, process + children", each(func(c contenderResult) float64 { return float64(k.get(c).PeakKB()) }), mem, true)
		rows[len(rows)-1].Ours, rows[len(rows)-1].PerRule, rows[len(rows)-1].Save =
			peakCell(k.get(res[0])), peakCell(k.get(res[1])), peakCell(k.get(res[2]))
	}
	steadyCPU := each(func(c contenderResult) float64 { return float64(c.Steady.CPUPerSync) })
	add("steady state: CPU per sync", steadyCPU, dur, true)
	last := &rows[len(rows)-1]
	last.Ours += fmt.Sprintf(" (%d syncs)", res[0].Steady.Syncs)
	last.PerRule += fmt.Sprintf(" (N=%d)", res[1].Steady.Syncs)
	last.Save += fmt.Sprintf(" (N=%d)", res[2].Steady.Syncs)
	add("steady state: processes per sync", each(func(c contenderResult) float64 { return c.Steady.ProcsPerSync }), fmtProcs, true)
	for i, kind := range repairKinds {
		rows = append(rows, row{Scenario: sc, Figure: "repair: " + kind, Ours: repairCell(r.Repair[i]),
			PerRule: "60 s (poll interval)", Save: "60 s (poll interval)"})
	}
	rows = append(rows, row{Scenario: sc, Figure: "idle daemon RSS", Ours: fmtMiB(r.IdleRSSKB)})
	return rows
}

// peakCell shows the sum and its two parts: own + largest child.
func peakCell(o oneShot) string {
	return fmt.Sprintf("%s (%.1f + %.1f)", fmtMiB(o.PeakKB()), float64(o.SelfPeakKB)/1024, float64(o.ChildPeakKB)/1024)
}

func repairCell(l repairLatency) string {
	if l.Text != "" {
		return l.Text
	}
	return fmt.Sprintf("%s (max %s, n=%d; one check %s)", fmtDur(l.Median), fmtDur(l.Max), l.N, fmtDur(l.Check))
}

// check is one target and whether it was met.
type check struct {
	Target string
	Met    bool
	Detail string
}

const (
	peakTargetKB      = 15 * 1024
	addrRepairTarget  = 50 * time.Millisecond
	rulesRepairTarget = 250 * time.Millisecond
	flatTarget        = 1.3
	steadyCPUTarget   = time.Millisecond
	// legacySteadyRatio bounds legacy's steady CPU per sync at 50,000
	// filter rules, as a fraction of the per-rule check's.
	legacySteadyRatio = 0.1
)

// checks computes the targets from the results.
func checks(results []scenarioResult) []check {
	var out []check
	// One-shot converged against the per-rule check.
	c := check{Target: "one-shot converged ≤ 1.0× per-rule check (wall and CPU), every scenario", Met: true}
	var detail []string
	for _, r := range results {
		o, p := r.Results[ours].Converged, r.Results[perRule].Converged
		w, u := float64(o.Wall)/float64(p.Wall), float64(o.CPU)/float64(p.CPU)
		ok := w <= 1 && u <= 1
		c.Met = c.Met && ok
		detail = append(detail, fmt.Sprintf("%s: wall %.2f×, CPU %.2f×%s", r.Scenario, w, u, notMet(ok)))
	}
	c.Detail = strings.Join(detail, "; ")
	out = append(out, c)

	// nft flat in foreign rules.
	var base *scenarioResult
	for i, r := range results {
		if r.Scenario.Backend == "nft" && r.Scenario.Rules == 0 {
			base = &results[i]
		}
	}
	c = check{Target: fmt.Sprintf("nft: ours one-shot converged at 50,000 ÷ at 0 foreign rules ≤ %.1f (wall and CPU)", flatTarget), Met: base != nil}
	detail = nil
	for _, r := range results {
		if base == nil || r.Scenario.Backend != "nft" || r.Scenario.Rules != 50000 {
			continue
		}
		o, z := r.Results[ours].Converged, base.Results[ours].Converged
		w, u := float64(o.Wall)/float64(z.Wall), float64(o.CPU)/float64(z.CPU)
		ok := w <= flatTarget && u <= flatTarget
		c.Met = c.Met && ok
		detail = append(detail, fmt.Sprintf("%s: wall %.2f, CPU %.2f%s", r.Scenario, w, u, notMet(ok)))
	}
	if len(detail) == 0 {
		c.Met = false
		detail = append(detail, "not measured (no nft scenario with 0 and 50,000 foreign rules)")
	}
	c.Detail = strings.Join(detail, "; ")
	out = append(out, c)

	// Steady state.
	cn := check{Target: "steady state, nft: 0 processes and < 1 ms CPU per sync", Met: true}
	cl := check{Target: fmt.Sprintf("steady state, legacy: 0 processes per sync; CPU per sync at 50,000 in filter ≤ %.1f× the per-rule check's", legacySteadyRatio), Met: true}
	var dn, dl []string
	for _, r := range results {
		s := r.Results[ours].Steady
		if r.Scenario.Backend == "nft" {
			ok := s.ProcsPerSync == 0 && s.CPUPerSync < steadyCPUTarget
			cn.Met = cn.Met && ok
			dn = append(dn, fmt.Sprintf("%s: %s processes, %s%s", r.Scenario, fmtProcs(s.ProcsPerSync), fmtDur(s.CPUPerSync), notMet(ok)))
		} else {
			ok := s.ProcsPerSync == 0
			text := fmt.Sprintf("%s: %s processes, %s", r.Scenario, fmtProcs(s.ProcsPerSync), fmtDur(s.CPUPerSync))
			if r.Scenario.Table == "filter" && r.Scenario.Rules == 50000 {
				base := r.Results[perRule].Steady.CPUPerSync
				u := float64(s.CPUPerSync) / float64(base)
				ok = ok && base > 0 && u <= legacySteadyRatio
				text += fmt.Sprintf(" (%.2f× the per-rule check's %s)", u, fmtDur(base))
			}
			cl.Met = cl.Met && ok
			dl = append(dl, text+notMet(ok))
		}
	}
	cn.Detail, cl.Detail = strings.Join(dn, "; "), strings.Join(dl, "; ")
	out = append(out, cn, cl)

	// Peak memory.
	c = check{Target: "ours: peak memory of process plus children ≤ 15 MiB (one-shot converged and fresh apply), every scenario", Met: true}
	detail = nil
	for _, r := range results {
		pk := max(r.Results[ours].Converged.PeakKB(), r.Results[ours].Fresh.PeakKB())
		ok := pk <= peakTargetKB
		c.Met = c.Met && ok
		detail = append(detail, fmt.Sprintf("%s: %s%s", r.Scenario, fmtMiB(pk), notMet(ok)))
	}
	c.Detail = strings.Join(detail, "; ")
	out = append(out, c)

	// Repair.
	ca := check{Target: "repair of the address ≤ 50 ms (median)", Met: true}
	cr := check{Target: "repair of rules ≤ 250 ms (median; chain and jump)", Met: true}
	var da, dr []string
	for _, r := range results {
		a := r.Repair[0]
		ok := a.N > 0 && a.Median <= addrRepairTarget
		ca.Met = ca.Met && ok
		da = append(da, fmt.Sprintf("%s: %s (max %s)%s", r.Scenario, fmtDur(a.Median), fmtDur(a.Max), notMet(ok)))
		for i := 1; i < 3; i++ {
			l := r.Repair[i]
			ok := l.N > 0 && l.Median <= rulesRepairTarget
			cr.Met = cr.Met && ok
			dr = append(dr, fmt.Sprintf("%s %s: %s (max %s)%s", r.Scenario, repairKinds[i], fmtDur(l.Median), fmtDur(l.Max), notMet(ok)))
		}
	}
	ca.Detail, cr.Detail = strings.Join(da, "; "), strings.Join(dr, "; ")
	out = append(out, ca, cr)
	return out
}

func notMet(ok bool) string {
	if ok {
		return ""
	}
	return " **(not met)**"
}

func checkList(cs []check) string {
	var b strings.Builder
	for _, c := range cs {
		verdict := "met"
		if !c.Met {
			verdict = "**not met**"
		}
		fmt.Fprintf(&b, "- %s: %s. %s\n", c.Target, verdict, c.Detail)
	}
	return b.String()
}

// clientTable formats the client paths' figures as one markdown table.
func clientTable(rs []clientResult) string {
	var b strings.Builder
	b.WriteString("| backend | path | connections | set up per second | connect p50 | connect p99 | conntrack entries per 1,000 connections |\n")
	b.WriteString("| --- | --- | ---: | ---: | ---: | ---: | ---: |\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s |\n",
			r.Backend, strings.ReplaceAll(r.Path.String(), "|", `\|`), thousands(r.Conns), thousands(int(r.Rate()+0.5)),
			fmtMicros(r.P50), fmtMicros(r.P99), fmt.Sprintf("%.0f", r.EntriesPer1000()))
	}
	return b.String()
}

// fmtMicros prints a short duration in microseconds.
func fmtMicros(d time.Duration) string {
	return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
}

// clientChecks computes the client paths' targets: interception leaves no
// conntrack entry, and was measured on every backend the plan names.
func clientChecks(rs []clientResult) []check {
	c := check{Target: "client paths, intercepted: 0 conntrack entries per 1,000 connections", Met: true}
	var detail []string
	for _, r := range rs {
		if r.Path != intercepted {
			continue
		}
		ok := r.Conns > 0 && r.Entries == 0
		c.Met = c.Met && ok
		detail = append(detail, fmt.Sprintf("%s: %d entries after %s connections%s", r.Backend, r.Entries, thousands(r.Conns), notMet(ok)))
	}
	if len(detail) == 0 {
		c.Met = false
		detail = append(detail, "not measured")
	}
	c.Detail = strings.Join(detail, "; ")
	return []check{c}
}
