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
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	stats := []pathStats{
		// Overlaps the control's failure, then one of its own.
		{Failed: 2, failures: []span{{at(0), at(300)}, {at(1000), at(1300)}}},
		// Ends exactly when the control's failure starts: no overlap.
		{Failed: 1, failures: []span{{at(0), at(250)}}},
		{Failed: 1, failures: []span{{at(250), at(550)}}}, // the control
	}
	markStalls(stats)
	if stats[0].InStall != 1 || stats[1].InStall != 0 {
		t.Errorf("InStall = %d, %d; want 1, 0", stats[0].InStall, stats[1].InStall)
	}
	r := result{Scenario: scenario{Kind: lifecycle}, PathNames: []string{"a", "b", "control"}, Paths: stats}
	if got := r.failed() - r.inStall(); got != 2 {
		t.Errorf("failures outside stalls = %d, want 2", got)
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
