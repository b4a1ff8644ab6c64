package main

import (
	"strings"
	"testing"
	"time"
)

func TestDefaultTCPWait(t *testing.T) {
	for _, tc := range []struct {
		gap    time.Duration
		failed int
		want   time.Duration
	}{
		{gap: 900 * time.Millisecond, failed: 0, want: 0}, // a stall without a failure: no outage
		{gap: 40 * time.Millisecond, failed: 3, want: time.Second},
		{gap: time.Second, failed: 3, want: time.Second},
		{gap: 1010 * time.Millisecond, failed: 3, want: 3 * time.Second},
		{gap: 5500 * time.Millisecond, failed: 9, want: 7 * time.Second},
		{gap: 20 * time.Second, failed: 9, want: 31 * time.Second},
	} {
		if got := defaultTCPWait(tc.gap, tc.failed); got != tc.want {
			t.Errorf("defaultTCPWait(%s, %d) = %s, want %s", tc.gap, tc.failed, got, tc.want)
		}
	}
}

func TestMarkStalls(t *testing.T) {
	t0 := time.Now()
	at := func(from, to int) failure {
		return failure{span: span{t0.Add(time.Duration(from) * time.Millisecond), t0.Add(time.Duration(to) * time.Millisecond)}}
	}
	late := func(f failure) failure {
		f.late = true
		return f
	}
	stats := []pathStats{
		// Overlaps the control's failure, then one of its own.
		{Failed: 2, failures: []failure{at(0, 300), at(1000, 1300)}},
		// Ends exactly when the control's failure starts: no overlap.
		{Failed: 1, failures: []failure{at(0, 250)}},
		// Answered late, outside the control's failure, and one late
		// inside it.
		{Failed: 2, Late: 2, failures: []failure{late(at(2000, 2300)), late(at(300, 600))}},
		{Failed: 1, failures: []failure{at(250, 550)}}, // the control
	}
	markStalls(stats)
	if stats[0].InStall != 1 || stats[1].InStall != 0 || stats[2].InStall != 1 {
		t.Errorf("InStall = %d, %d, %d; want 1, 0, 1", stats[0].InStall, stats[1].InStall, stats[2].InStall)
	}
	if stats[0].Own != 1 || stats[1].Own != 1 || stats[2].Own != 0 {
		t.Errorf("Own = %d, %d, %d; want 1, 1, 0", stats[0].Own, stats[1].Own, stats[2].Own)
	}
	r := result{Scenario: scenario{Kind: lifecycle}, PathNames: []string{"a", "b", "c", "control"}, Paths: stats, Changes: -1}
	if got := r.own(); got != 2 {
		t.Errorf("failures held against the sidecar = %d, want 2", got)
	}
	if got, want := r.verdict(), "**missed**: 5 failed, 2 of them neither"; !strings.HasPrefix(got, want) {
		t.Errorf("verdict = %q, want it to start with %q", got, want)
	}
	// Without the two of its own, every failure is the machine's.
	r.Paths = []pathStats{stats[2], stats[3]}
	r.PathNames = []string{"c", "control"}
	markStalls(r.Paths)
	if got, want := r.verdict(), "met: 0 failed but 2 the machine's: 1 during stalls that failed the control 1 times, 1 answered in time by the kernel"; !strings.HasPrefix(got, want) {
		t.Errorf("verdict = %q, want it to start with %q", got, want)
	}
}

func TestVerdictExternal(t *testing.T) {
	served := pathStats{Failed: 3, MaxGap: 180 * time.Millisecond}
	for _, tc := range []struct {
		name           string
		backend        string
		controlGap     time.Duration
		flushesControl bool
		want           string
	}{
		{"nft, quiet machine", "nft", 20 * time.Millisecond, false, "**missed**"},
		{"nft, the control stalled too", "nft", 170 * time.Millisecond, false, "not measured"},
		{"nft, the fault flushes the control's rule", "nft", 170 * time.Millisecond, true, "**missed**"},
		{"legacy, met", "legacy", 20 * time.Millisecond, false, "met"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := result{
				Backend:   tc.backend,
				Scenario:  scenario{Kind: external, flushesControl: tc.flushesControl},
				PathNames: []string{"a", "control"},
				Paths:     []pathStats{served, {MaxGap: tc.controlGap}},
			}
			if got := r.verdict(); !strings.HasPrefix(got, tc.want) {
				t.Errorf("verdict = %q, want it to start with %q", got, tc.want)
			}
		})
	}
}
