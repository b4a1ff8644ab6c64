package main

import (
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
