package apply

import (
	"errors"
	"slices"
	"testing"
	"time"
)

var t0 = time.Unix(1_800_000_000, 0)

func ms(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }

func TestDebounce(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	d := debounce{quiet: 10 * time.Millisecond, max: 100 * time.Millisecond}
	if _, pending := d.due(t0); pending {
		t.Fatal("pending before any trigger")
	}
	// A burst every 2ms for 30ms: due 10ms after the last one.
	for i := 0; i <= 30; i += 2 {
		d.add(ms(i), TriggerNFTables)
	}
	if wait, pending := d.due(ms(30)); !pending || wait != 10*time.Millisecond {
		t.Errorf("due = %v, %v; want 10ms, pending", wait, pending)
	}
	if wait, _ := d.due(ms(45)); wait != 0 {
		t.Errorf("past due: wait %v, want 0", wait)
	}
	if got, sc := d.takeAll(); got != TriggerNFTables || sc != (scope{rules: true}) {
		t.Errorf("takeAll = %q, %v; want the nftables trigger and the rules", got, sc)
	}
	if _, pending := d.due(ms(46)); pending {
		t.Error("still pending after take")
	}
	// Endless churn: due 100ms after the first trigger, not never.
	d.add(ms(200), TriggerAddress)
	for i := 202; i < 400; i += 2 {
		d.add(ms(i), TriggerNFTables)
	}
	if wait, _ := d.due(ms(290)); wait != 10*time.Millisecond {
		t.Errorf("amid churn: wait %v, want 10ms (100ms after the first trigger)", wait)
	}
	if got, sc := d.takeAll(); got != TriggerAddress || sc != (scope{address: true, rules: true}) {
		t.Errorf("takeAll = %q, %v; want the burst's first trigger, and what all of them concern", got, sc)
	}
}

// TestScheduleEvents proves that events become one verification of what
// they concern, once they are quiet, and that the timer is told when.
func TestScheduleEvents(t *testing.T) {
	p := newSchedule(time.Minute, true)
	p.done(ms(0), ms(1), everything, nil) // the start-up sync
	if wait := p.event(ms(10), TriggerAddress); wait != debounceQuiet {
		t.Errorf("wait after one event = %v, want %v", wait, debounceQuiet)
	}
	if wait := p.event(ms(15), TriggerNFTables); wait != debounceQuiet {
		t.Errorf("wait after a second event = %v, want %v", wait, debounceQuiet)
	}
	if _, _, wait, run := p.fire(ms(20)); run || wait != 5*time.Millisecond {
		t.Errorf("fire before due: run %v, wait %v; want 5ms more", run, wait)
	}
	trigger, sc, _, run := p.fire(ms(25))
	if !run || trigger != TriggerAddress || sc != (scope{address: true, rules: true}) {
		t.Errorf("fire when due = %q %v %v; want the first trigger, address and rules", trigger, sc, run)
	}
	if _, _, wait, run := p.fire(ms(26)); run || wait != 0 {
		t.Errorf("fire with nothing pending: run %v, wait %v", run, wait)
	}
}

// TestScheduleTick proves what an interval sync checks: the rules and
// stale addresses always, whatever events are pending, and the address and
// link only without events, after a failure, or every addressRecheckEvery.
func TestScheduleTick(t *testing.T) {
	withEvents := newSchedule(time.Minute, true)
	withEvents.done(t0, t0, everything, nil)
	if trigger, sc := withEvents.tick(t0.Add(time.Minute)); trigger != TriggerInterval || sc != (scope{rules: true, stale: true}) {
		t.Errorf("interval sync with events: %q %v; want the rules and stale addresses", trigger, sc)
	}
	withEvents.event(t0.Add(61*time.Second), TriggerLink)
	if trigger, sc := withEvents.tick(t0.Add(62 * time.Second)); trigger != TriggerLink || sc != everything {
		t.Errorf("interval sync with a link event pending: %q %v; want the event's trigger and everything", trigger, sc)
	}
	if _, _, _, run := withEvents.fire(t0.Add(63 * time.Second)); run {
		t.Error("the pending event ran again after the interval sync covered it")
	}
	if _, sc := withEvents.tick(t0.Add(addressRecheckEvery)); !sc.address {
		t.Errorf("interval sync %s after the last address check: %v; want the address checked", addressRecheckEvery, sc)
	}
	without := newSchedule(time.Minute, false)
	without.done(t0, t0, everything, nil)
	if _, sc := without.tick(t0.Add(time.Minute)); sc != everything {
		t.Errorf("interval sync without events: %v; want everything", sc)
	}
	if trigger, sc := without.startup(); trigger != TriggerStartup || sc != everything {
		t.Errorf("startup: %q %v; want everything", trigger, sc)
	}
}

// TestScheduleAfterFailure proves that after a failed sync every
// verification checks everything, until one succeeds.
func TestScheduleAfterFailure(t *testing.T) {
	p := newSchedule(time.Minute, true)
	o := p.done(t0, t0, everything, errors.New("boom"))
	if o.failures != 1 || o.holdOff != 0 {
		t.Errorf("first failure: %+v; want 1 failure and no hold-off", o)
	}
	p.event(ms(10), TriggerNFTables)
	if _, sc, _, run := p.fire(ms(20)); !run || sc != everything {
		t.Errorf("an nftables event after a failure: run %v, %v; want everything", run, sc)
	}
	o = p.done(ms(20), ms(21), everything, nil)
	if o.recovered != 1 || o.released {
		t.Errorf("success after one failure: %+v; want recovered 1, no hold released", o)
	}
	p.event(ms(30), TriggerNFTables)
	if _, sc, _, run := p.fire(ms(40)); !run || sc != (scope{rules: true}) {
		t.Errorf("an nftables event after the recovery: %v; want the rules alone", sc)
	}
}

// TestScheduleHoldOff proves that from the holdAfter-th failed sync in a
// row, verifications on events wait debounceMax, doubling up to the
// interval; interval syncs still run; a success ends the hold.
func TestScheduleHoldOff(t *testing.T) {
	const interval = time.Second
	p := newSchedule(interval, true)
	now := t0
	var holds []time.Duration
	for i := 1; i <= 7; i++ {
		o := p.done(now, now, everything, errors.New("read-back differs"))
		if o.failures != i || o.holding != (i == holdAfter) {
			t.Errorf("failure %d: %+v", i, o)
		}
		holds = append(holds, o.holdOff)
		if o.holdOff > 0 {
			// An event right away waits out the hold.
			if wait := p.event(now, TriggerNFTables); wait != o.holdOff {
				t.Errorf("failure %d: event waits %v, want the hold-off %v", i, wait, o.holdOff)
			}
			if _, _, _, run := p.fire(now.Add(o.holdOff - time.Millisecond)); run {
				t.Errorf("failure %d: a verification ran inside the hold-off", i)
			}
			if _, _, _, run := p.fire(now.Add(o.holdOff)); !run {
				t.Errorf("failure %d: no verification at the end of the hold-off", i)
			}
		}
		now = now.Add(time.Second)
	}
	want := []time.Duration{0, 0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, interval}
	for i := range want {
		if holds[i] != want[i] {
			t.Errorf("hold-offs %v, want %v", holds, want)
			break
		}
	}
	if _, sc := p.tick(now); sc != everything {
		t.Errorf("an interval sync while held: %v; want it to run, checking everything", sc)
	}
	o := p.done(now, now, everything, nil)
	if !o.released || o.recovered != 7 {
		t.Errorf("the success after the hold: %+v; want released after 7", o)
	}
	if wait := p.event(now, TriggerNFTables); wait != debounceQuiet {
		t.Errorf("an event after the hold ended waits %v, want %v", wait, debounceQuiet)
	}
}

// TestScheduleRetriesAFailedSync proves that a failed sync is retried on
// its own, checking everything: at once (after the debounce) for the first
// failures, then after the hold-off, never later than the interval.
func TestScheduleRetriesAFailedSync(t *testing.T) {
	const interval = time.Second
	p := newSchedule(interval, true)
	now := t0
	var retries []time.Duration
	for i := 1; i <= 8; i++ {
		o := p.done(now, now, everything, errors.New("read-back differs"))
		retries = append(retries, o.retryIn)
		if _, _, _, run := p.fire(now.Add(o.retryIn - time.Microsecond)); run {
			t.Errorf("failure %d: the retry ran before %v", i, o.retryIn)
		}
		trigger, sc, _, run := p.fire(now.Add(o.retryIn))
		if !run || trigger != TriggerRetry || sc != everything {
			t.Errorf("failure %d: at %v: run %v, %q, %v; want a retry of everything", i, o.retryIn, run, trigger, sc)
		}
		now = now.Add(o.retryIn)
	}
	want := []time.Duration{debounceQuiet, debounceQuiet, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, interval, interval}
	if !slices.Equal(retries, want) {
		t.Errorf("retries after %v, want %v", retries, want)
	}
	// A success ends the retries.
	p.done(now, now, everything, nil)
	if _, pending := p.due(now); pending {
		t.Error("a retry is pending after a sync succeeded")
	}
}
