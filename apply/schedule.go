package apply

import (
	"time"
)

// The sync loop's policy: when a verification runs, and what it checks.
// Sidecar.Run owns the channels and timers and does the syncing; schedule
// decides, from the times it is given, so that every branch is tested with
// made-up times in microseconds (schedule_test.go).

// Debounce of event-triggered verifications: one runs once events have
// been quiet for debounceQuiet, and at the latest debounceMax after the
// first event of a burst, so that kube-proxy writing thousands of rules
// costs one verification, and a change amid constant churn is still
// repaired within debounceMax plus the verification itself.
const (
	debounceQuiet = 10 * time.Millisecond
	debounceMax   = 100 * time.Millisecond
)

// A failed sync is retried on its own (TriggerRetry), like a verification
// on events: at once, and held back as below from the holdAfter-th failure
// in a row, so that a node whose repair was undone at once (where the
// undoing caused no event or change of info that we did not already know)
// or whose xtables lock was held is not left until the interval.
//
// holdAfter is how many syncs in a row may fail before verifications on
// events are held back. Where repairs do not stick (a restore program that
// stores rules in a form that lists differently, another agent reverting
// ours at once), the read-back after each write fails the sync, and every
// write of ours is an nftables event that triggers the verification that
// writes again: a loop at the speed of the debounce. From the holdAfter-th
// failed sync in a row on, a verification on events waits debounceMax,
// doubling with each further one up to the interval, until a sync
// succeeds. Interval syncs are never held back. Syncs that repair and
// succeed never count: drift repaired as fast as someone makes it is the
// daemon's job.
const holdAfter = 3

// addressRecheckEvery is how often an interval sync checks the address and
// link although no event said they changed: the kernel reports every change
// to them, so this is only a safety net against a lost event.
const addressRecheckEvery = 10 * time.Minute

// schedule is the loop's policy. It is not safe for concurrent use: the
// loop's goroutine alone calls it.
type schedule struct {
	interval time.Duration
	// events is whether kernel events are watched; without them every
	// interval sync checks everything.
	events bool

	pending debounce
	// failures counts the syncs in a row that failed.
	failures int
	// holdUntil is when a verification on events may run again; zero
	// while none is held back.
	holdUntil time.Time
	// addressCheckedAt is when the last sync that checked the address and
	// link started; zero after a failed sync.
	addressCheckedAt time.Time
}

func newSchedule(interval time.Duration, events bool) *schedule {
	return &schedule{interval: interval, events: events, pending: debounce{quiet: debounceQuiet, max: debounceMax}}
}

// event records a trigger at now and returns how long until the pending
// verification may run.
func (p *schedule) event(now time.Time, t Trigger) time.Duration {
	p.pending.add(now, t)
	wait, _ := p.due(now)
	return wait
}

// due returns how long until the pending verification may run, and
// whether one is pending.
func (p *schedule) due(now time.Time) (time.Duration, bool) {
	wait, pending := p.pending.due(now)
	return max(wait, p.holdUntil.Sub(now)), pending
}

// fire is called when the timer set from event or due went off at now. It
// returns the verification to run, if one is due; otherwise how long to
// wait (0 and false when nothing is pending).
func (p *schedule) fire(now time.Time) (t Trigger, sc scope, wait time.Duration, run bool) {
	wait, pending := p.due(now)
	if !pending || wait > 0 {
		return "", scope{}, wait, false
	}
	t, sc = p.pending.takeAll()
	return t, p.widen(now, sc), 0, true
}

// tick returns the verification an interval sync at now runs: it covers
// whatever events are pending, checks the rules and looks for stale
// addresses.
func (p *schedule) tick(now time.Time) (Trigger, scope) {
	t, sc := p.pending.takeAll()
	if t == "" {
		t = TriggerInterval
	}
	return t, p.widen(now, sc.or(scope{rules: true, stale: true}))
}

// startup returns the first verification: everything.
func (p *schedule) startup() (Trigger, scope) { return TriggerStartup, everything }

// widen adds to sc what a sync at now must check beyond what its triggers
// concern: the address and link when no event would report a change to
// them, or when they were last checked addressRecheckEvery ago or more,
// or never since a failure; everything after a failed sync, since health
// reports the latest sync and only one that checks everything may say that
// all is well again.
func (p *schedule) widen(now time.Time, sc scope) scope {
	if !p.events || p.addressCheckedAt.IsZero() || now.Sub(p.addressCheckedAt) >= addressRecheckEvery {
		sc.address = true
	}
	if p.failures > 0 {
		sc = everything
	}
	return sc
}

// outcome is what a finished sync changed in the policy, for the log.
type outcome struct {
	// failures is the count of failed syncs in a row, this one included;
	// recovered is that count before a sync that succeeded again.
	failures, recovered int
	// holdOff is how long verifications on events are now held back; 0
	// when they are not. holding is set on the sync that starts holding.
	holdOff time.Duration
	holding bool
	// released is set on the sync that ends a hold.
	released bool
	// retryIn is when the retry of a failed sync runs.
	retryIn time.Duration
}

// done records a sync of sc that started at started and ended at now with
// err.
func (p *schedule) done(started, now time.Time, sc scope, err error) outcome {
	if sc.address {
		p.addressCheckedAt = started
	}
	if err == nil {
		o := outcome{recovered: p.failures, released: p.failures >= holdAfter}
		p.failures, p.holdUntil = 0, time.Time{}
		return o
	}
	p.addressCheckedAt = time.Time{}
	p.failures++
	o := outcome{failures: p.failures}
	if p.failures >= holdAfter {
		o.holdOff = min(debounceMax<<min(p.failures-holdAfter, 20), p.interval)
		o.holding = p.failures == holdAfter
		p.holdUntil = now.Add(o.holdOff)
	}
	p.pending.add(now, TriggerRetry)
	o.retryIn, _ = p.due(now)
	return o
}

// debounce coalesces bursts of triggers into one verification.
type debounce struct {
	quiet, max time.Duration
	// first and last are the times of the first and latest trigger of the
	// pending burst; first is zero when nothing is pending.
	first, last time.Time
	trigger     Trigger // of the first
	scope       scope   // what all of them concern
}

func (d *debounce) add(now time.Time, t Trigger) {
	if d.first.IsZero() {
		d.first, d.trigger = now, t
	}
	d.last = now
	d.scope = d.scope.or(scopeOf(t))
}

// due returns how long until the pending verification should run, and
// whether one is pending at all.
func (d *debounce) due(now time.Time) (wait time.Duration, pending bool) {
	if d.first.IsZero() {
		return 0, false
	}
	wait = min(d.last.Add(d.quiet).Sub(now), d.first.Add(d.max).Sub(now))
	return max(wait, 0), true
}

// takeAll ends the pending burst and returns its first trigger and what
// all its triggers concern.
func (d *debounce) takeAll() (Trigger, scope) {
	t, sc := d.trigger, d.scope
	d.first, d.last, d.trigger, d.scope = time.Time{}, time.Time{}, "", scope{}
	return t, sc
}
