package main

import (
	"encoding/binary"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// statsFixture is a struct taskstats of version 13 (416 bytes) as the
// kernel lays it out on x86_64 and arm64; the offsets are offsetof() of
// <linux/taskstats.h>, written out here independently of the parser.
func statsFixture(pid, tgid, ppid uint32, comm string, utimeUS, stimeUS, hiwaterKB, exeInode uint64) []byte {
	b := make([]byte, 416)
	ne := binary.NativeEndian
	ne.PutUint16(b[0:], 13)
	ne.PutUint64(b[64:], (utimeUS+stimeUS)*1000+123) // cpu_run_real_total, ns
	copy(b[80:112], comm)
	ne.PutUint32(b[128:], pid)
	ne.PutUint32(b[132:], ppid)
	ne.PutUint64(b[152:], utimeUS)
	ne.PutUint64(b[160:], stimeUS)
	ne.PutUint64(b[200:], hiwaterKB)
	ne.PutUint32(b[368:], tgid)
	ne.PutUint64(b[392:], exeInode)
	return b
}

func attr(typ uint16, data []byte) []byte {
	n := 4 + len(data)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint16(b[0:], uint16(n))
	binary.NativeEndian.PutUint16(b[2:], typ)
	copy(b[4:], data)
	return b
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// nlmsg wraps payload in a netlink header of type typ.
func nlmsg(typ uint16, payload []byte) []byte {
	n := 16 + len(payload)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], typ)
	copy(b[16:], payload)
	return b
}

// exitEvent is a TASKSTATS_CMD_NEW message of family famID with one
// per-task record, and optionally a per-process aggregate after it.
func exitEvent(famID uint16, stats []byte, withTGID bool) []byte {
	payload := []byte{2, 1, 0, 0} // genl header: TASKSTATS_CMD_NEW, version 1
	pid := binary.NativeEndian.Uint32(stats[128:])
	payload = append(payload, attr(4|0x8000, append(attr(1, u32(pid)), attr(3, stats)...))...) // AGGR_PID, nested
	if withTGID {
		payload = append(payload, attr(5|0x8000, append(attr(2, u32(pid)), attr(3, stats)...))...) // AGGR_TGID
	}
	return nlmsg(famID, payload)
}

func TestParseTaskstats(t *testing.T) {
	const fam = 0x1b
	ack := nlmsg(2, make([]byte, 20)) // NLMSG_ERROR with errno 0: the registration's ack
	datagram := append(append(ack,
		exitEvent(fam, statsFixture(101, 100, 1, "apiserver-proxy", 1500, 2500, 11704, 77), false)...),
		exitEvent(fam, statsFixture(200, 200, 100, "iptables-nft", 3000, 4000, 2240, 99), true)...)

	got, err := parseTaskstats(datagram)
	if err != nil {
		t.Fatalf("parseTaskstats: %v", err)
	}
	want := []taskRecord{
		{PID: 101, TGID: 100, PPID: 1, Comm: "apiserver-proxy", UTime: 1500 * time.Microsecond, STime: 2500 * time.Microsecond, RunTime: 4000123, HiwaterRSSKB: 11704, ExeInode: 77},
		{PID: 200, TGID: 200, PPID: 100, Comm: "iptables-nft", UTime: 3 * time.Millisecond, STime: 4 * time.Millisecond, RunTime: 7000123, HiwaterRSSKB: 2240, ExeInode: 99},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("records (-want +got):\n%s", diff)
	}
}

func TestParseTaskstatsErrors(t *testing.T) {
	errMsg := nlmsg(2, append(binary.NativeEndian.AppendUint32(nil, uint32(0xffffffff)), make([]byte, 16)...)) // -EPERM
	if _, err := parseTaskstats(errMsg); err == nil || !strings.Contains(err.Error(), "operation not permitted") {
		t.Errorf("an NLMSG_ERROR with -EPERM: got %v, want operation not permitted", err)
	}
	ev := exitEvent(0x1b, statsFixture(1, 1, 0, "x", 0, 0, 0, 0), false)
	if _, err := parseTaskstats(ev[:len(ev)-8]); err == nil {
		t.Error("a truncated message parsed without error")
	}
	short := nlmsg(0x1b, append([]byte{2, 1, 0, 0}, attr(4, attr(3, make([]byte, 100)))...))
	if _, err := parseTaskstats(short); err == nil {
		t.Error("a 100-byte struct taskstats parsed without error")
	}
}

func TestUsageOf(t *testing.T) {
	const sidecarIno, iptablesIno = 77, 99
	recs := []taskRecord{
		// The sidecar: two threads.
		{PID: 100, TGID: 100, PPID: 1, UTime: 4 * time.Millisecond, HiwaterRSSKB: 11000, ExeInode: sidecarIno},
		{PID: 101, TGID: 100, PPID: 1, STime: 2 * time.Millisecond, HiwaterRSSKB: 11500, ExeInode: sidecarIno},
		// Go's pidfd probe: a copy that never ran a program.
		{PID: 102, TGID: 102, PPID: 100, HiwaterRSSKB: 11000, ExeInode: sidecarIno},
		// Two iptables runs.
		{PID: 103, TGID: 103, PPID: 100, UTime: 4 * time.Millisecond, RunTime: time.Millisecond, HiwaterRSSKB: 2000, ExeInode: iptablesIno},
		{PID: 104, TGID: 104, PPID: 100, STime: time.Millisecond, HiwaterRSSKB: 2500, ExeInode: iptablesIno},
		// Someone else's process.
		{PID: 300, TGID: 300, PPID: 1, UTime: time.Second, HiwaterRSSKB: 90000, ExeInode: 5},
	}
	want := usage{CPU: 8 * time.Millisecond, SelfPeakKB: 11500, ChildPeakKB: 2500, Children: 2, Clones: 1}
	if diff := cmp.Diff(want, usageOf(recs, 100, sidecarIno)); diff != "" {
		t.Errorf("usageOf (-want +got):\n%s", diff)
	}
	wantKids := usage{CPU: 2 * time.Millisecond, ChildPeakKB: 2500, Children: 2, Clones: 1}
	if diff := cmp.Diff(wantKids, childrenOf(recs, 100, sidecarIno)); diff != "" {
		t.Errorf("childrenOf (-want +got):\n%s", diff)
	}
}

// ruleCounts counts the -A lines of a restore payload by chain, and checks
// that every chain jumped to is declared or built in.
func ruleCounts(t *testing.T, payload string) (total int, byChain map[string]int) {
	t.Helper()
	declared := map[string]bool{"PREROUTING": true, "INPUT": true, "FORWARD": true, "OUTPUT": true, "POSTROUTING": true}
	byChain = map[string]int{}
	jump := regexp.MustCompile(` -j ([A-Z][A-Z0-9-]+)`)
	for _, l := range strings.Split(strings.TrimSpace(payload), "\n") {
		switch {
		case strings.HasPrefix(l, ":"):
			name, _, _ := strings.Cut(l[1:], " ")
			if declared[name] {
				t.Errorf("chain %s declared twice", name)
			}
			declared[name] = true
		case strings.HasPrefix(l, "-A "):
			chain, _, _ := strings.Cut(l[3:], " ")
			if !declared[chain] {
				t.Errorf("rule in undeclared chain: %s", l)
			}
			if m := jump.FindStringSubmatch(l); m != nil && strings.HasPrefix(m[1], "KUBE-") || m != nil && strings.HasPrefix(m[1], "CNI-") {
				if !declared[m[1]] {
					t.Errorf("jump to undeclared chain: %s", l)
				}
			}
			byChain[chain]++
			total++
		}
	}
	return total, byChain
}

func TestPayloadCounts(t *testing.T) {
	for _, n := range []int{0, 3, 10, 10000, 50000} {
		for _, tc := range []struct {
			table string
			gen   func(int) string
			hooks []string
		}{
			{"nat", natPayload, []string{"PREROUTING", "OUTPUT"}},
			{"filter", filterPayload, []string{"FORWARD", "INPUT", "OUTPUT"}},
		} {
			p := tc.gen(n)
			if n == 0 {
				if p != "" {
					t.Errorf("%s payload of 0 rules is %q, want empty", tc.table, p)
				}
				continue
			}
			if !strings.HasPrefix(p, "*"+tc.table+"\n") || !strings.HasSuffix(p, "COMMIT\n") {
				t.Errorf("%s payload of %d rules is not one *%s ... COMMIT block", tc.table, n, tc.table)
			}
			total, byChain := ruleCounts(t, p)
			if total != n {
				t.Errorf("%s payload: %d rules, want %d", tc.table, total, n)
			}
			if n < 10000 {
				continue
			}
			for _, h := range tc.hooks {
				if byChain[h] == 0 {
					t.Errorf("%s payload of %d rules has no rule in %s", tc.table, n, h)
				}
			}
		}
	}
}

func TestNATPayloadIsKubeProxyLike(t *testing.T) {
	p := natPayload(10000)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^-A KUBE-SERVICES -d 10\.0\.\d+\.\d+/32 -p tcp -m comment --comment "ns-\d+/svc-\d+:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-[0-9A-F]{16}$`),
		regexp.MustCompile(`(?m)^-A KUBE-SVC-[0-9A-F]{16} .*-m statistic --mode random --probability 0\.50000000000 -j KUBE-SEP-[0-9A-F]{16}$`),
		regexp.MustCompile(`(?m)^-A KUBE-SEP-[0-9A-F]{16} -s 10\.244\.\d+\.\d+/32 .*-j KUBE-MARK-MASQ$`),
		regexp.MustCompile(`(?m)^-A KUBE-SEP-[0-9A-F]{16} -p tcp .*-m tcp -j DNAT --to-destination 10\.244\.\d+\.\d+:8080$`),
		regexp.MustCompile(`(?m)^-A POSTROUTING .*-j KUBE-POSTROUTING$`),
	} {
		if !want.MatchString(p) {
			t.Errorf("nat payload has no line matching %s", want)
		}
	}
}

func TestMarkdownTable(t *testing.T) {
	got := markdownTable([]row{
		{Scenario: "nft, no foreign rules", Figure: "one-shot converged: wall", Ours: "12.0 ms", PerRule: "24.0 ms", Save: "16.0 ms", OursPerRule: "0.50×", OursPerSave: "0.75×"},
		{Scenario: "nft, no foreign rules", Figure: "repair: a|b", Ours: "11.5 ms (max 12.7 ms, n=3)", PerRule: "60 s (poll interval)"},
	})
	want := `| scenario | figure | ours | per-rule check | save and compare | ours ÷ per-rule | ours ÷ save |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
| nft, no foreign rules | one-shot converged: wall | 12.0 ms | 24.0 ms | 16.0 ms | 0.50× | 0.75× |
| nft, no foreign rules | repair: a\|b | 11.5 ms (max 12.7 ms, n=3) | 60 s (poll interval) | — | — | — |
`
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("markdownTable (-want +got):\n%s", diff)
	}
}

func TestFormatting(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{fmtDur(850 * time.Microsecond), "0.85 ms"},
		{fmtDur(12345 * time.Microsecond), "12.3 ms"},
		{fmtDur(1523 * time.Millisecond), "1.52 s"},
		{fmtMiB(11704), "11.4 MiB"},
		{ratio(1, 2), "0.50×"},
		{ratio(1, 0), ""},
		{fmtProcs(0), "0"},
		{fmtProcs(2.05), "2.05"},
		{thousands(50000), "50,000"},
		{scenario{"legacy", "filter", 50000}.String(), "legacy, 50,000 in filter"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

// TestChecks proves that the target check is computed from the figures:
// the same results pass or fail as the figures move across a target.
func TestChecks(t *testing.T) {
	good := func(sc scenario) scenarioResult {
		r := scenarioResult{Scenario: sc}
		r.Results[ours] = contenderResult{
			Converged: oneShot{Wall: 10 * time.Millisecond, CPU: 8 * time.Millisecond, SelfPeakKB: 11000, ChildPeakKB: 2000},
			Fresh:     oneShot{Wall: 20 * time.Millisecond, CPU: 16 * time.Millisecond, SelfPeakKB: 11000, ChildPeakKB: 2000},
			Steady:    steady{CPUPerSync: 500 * time.Microsecond},
		}
		r.Results[perRule] = contenderResult{Converged: oneShot{Wall: 20 * time.Millisecond, CPU: 16 * time.Millisecond},
			Steady: steady{CPUPerSync: 10 * time.Millisecond}}
		r.Repair = [3]repairLatency{{Median: 10 * time.Millisecond, N: 3}, {Median: 20 * time.Millisecond, N: 3}, {Median: 20 * time.Millisecond, N: 3}}
		return r
	}
	results := []scenarioResult{good(scenario{"nft", "", 0}), good(scenario{"nft", "nat", 50000}), good(scenario{"legacy", "filter", 50000})}
	for _, c := range checks(results) {
		if !c.Met {
			t.Errorf("%s: not met with good figures (%s)", c.Target, c.Detail)
		}
	}
	results[1].Results[ours].Converged.Wall = 14 * time.Millisecond // 1.4× the 0-rule figure
	results[2].Results[ours].Fresh.ChildPeakKB = 60000
	results[2].Results[ours].Steady.CPUPerSync = 2 * time.Millisecond // 0.2× the per-rule check
	results[0].Repair[1].Median = 300 * time.Millisecond
	notMet := map[string]bool{}
	for _, c := range checks(results) {
		if !c.Met {
			notMet[strings.SplitN(c.Target, ":", 2)[0]] = true
		}
	}
	want := map[string]bool{
		"nft":                  true, // flatness
		"steady state, legacy": true,
		"ours":                 true, // peak
		"repair of rules ≤ 250 ms (median; chain and jump)": true,
	}
	if diff := cmp.Diff(want, notMet); diff != "" {
		t.Errorf("targets not met (-want +got):\n%s", diff)
	}
}

func TestMissingPrograms(t *testing.T) {
	look := func(name string) (string, error) {
		if name == "iptables-legacy" || name == "ip" {
			return "", exec.ErrNotFound
		}
		return "/usr/sbin/" + name, nil
	}
	if diff := cmp.Diff([]string{"ip", "iptables-legacy"}, missingPrograms(look, requiredPrograms)); diff != "" {
		t.Errorf("missing (-want +got):\n%s", diff)
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 200; i++ {
		d = append(d, time.Duration(i)*time.Microsecond)
	}
	for _, tc := range []struct {
		p    int
		want time.Duration
	}{{50, 100 * time.Microsecond}, {99, 198 * time.Microsecond}, {100, 200 * time.Microsecond}} {
		if got := percentile(d, tc.p); got != tc.want {
			t.Errorf("p%d of 1..200 µs: %s, want %s", tc.p, got, tc.want)
		}
	}
	if got := percentile([]time.Duration{7}, 99); got != 7 {
		t.Errorf("p99 of one value: %s", got)
	}
	if got := percentile(nil, 50); got != 0 {
		t.Errorf("p50 of nothing: %s", got)
	}
}

func TestClientTableAndChecks(t *testing.T) {
	rs := []clientResult{
		{Backend: "nft", Path: viaDNAT, Conns: 10000, Elapsed: 800 * time.Millisecond, P50: 17 * time.Microsecond, P99: 150 * time.Microsecond, Entries: 9994},
		{Backend: "nft", Path: intercepted, Conns: 10000, Elapsed: time.Second, P50: 15 * time.Microsecond, P99: 160 * time.Microsecond},
	}
	want := "| backend | path | connections | set up per second | connect p50 | connect p99 | conntrack entries per 1,000 connections |\n" +
		"| --- | --- | ---: | ---: | ---: | ---: | ---: |\n" +
		"| nft | through kube-proxy's DNAT (`--ip-address 10.96.0.2`, no rules: tracked) | 10,000 | 12,500 | 17 µs | 150 µs | 999 |\n" +
		"| nft | intercepted (`--ip-address 10.96.0.2,100.64.0.1 --setup-iptables`: untracked) | 10,000 | 10,000 | 15 µs | 160 µs | 0 |\n"
	if diff := cmp.Diff(want, clientTable(rs)); diff != "" {
		t.Errorf("clientTable (-want +got):\n%s", diff)
	}
	if c := clientChecks(rs); len(c) != 1 || !c[0].Met {
		t.Errorf("no entry after interception: %+v, want met", c)
	}
	rs[1].Entries = 3
	if c := clientChecks(rs); c[0].Met || !strings.Contains(c[0].Detail, "3 entries") {
		t.Errorf("3 entries after interception: %+v, want not met, naming them", c)
	}
	if c := clientChecks(rs[:1]); c[0].Met {
		t.Errorf("interception not measured: %+v, want not met", c)
	}
}

func TestPlanOnly(t *testing.T) {
	for _, quick := range []bool{false, true} {
		p := newPlan(quick).only("legacy")
		if len(p.Scenarios) == 0 {
			t.Fatalf("quick %v: no legacy scenario", quick)
		}
		for _, sc := range p.Scenarios {
			if sc.Backend != "legacy" {
				t.Errorf("quick %v: scenario %s kept", quick, sc)
			}
		}
		for _, b := range p.ClientBackends {
			if b != "legacy" {
				t.Errorf("quick %v: client paths on %s kept", quick, b)
			}
		}
		if all := newPlan(quick).only(""); len(all.Scenarios) != len(newPlan(quick).Scenarios) {
			t.Errorf("quick %v: only(\"\") dropped scenarios", quick)
		}
	}
}
