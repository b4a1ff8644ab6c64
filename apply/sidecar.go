package apply

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"
)

// Sidecar keeps the address and, optionally, the rules of every address
// family in place.
type Sidecar struct {
	address  *Address
	rules    []*Rules
	observer Observer
}

// NewSidecar returns a Sidecar that keeps address and, if rules is not
// empty, the rules, and reports what it does to o.
func NewSidecar(address *Address, rules []*Rules, o Observer) *Sidecar {
	return &Sidecar{address: address, rules: rules, observer: o}
}

// Sync ensures the address, then the rules of each family, once. A failure
// of one does not stop the others; the errors are joined.
func (s *Sidecar) Sync(ctx context.Context) error {
	return s.verify(ctx, TriggerStartup)
}

func (s *Sidecar) verify(ctx context.Context, trigger Trigger) error {
	s.observer.Verification(string(trigger))
	res := SyncResult{Started: time.Now()}
	repairs, err := s.address.Ensure()
	for _, r := range repairs {
		klog.InfoS("Repaired address", "object", r.Kind.Object(), "repair", r.String())
		s.observer.Repaired(r.Kind.Object())
	}
	if err != nil {
		res.Address = fmt.Errorf("address: %w", err)
	}
	var errs []error
	drifted := 0
	for _, r := range s.rules {
		drifts, err := r.Sync(ctx)
		for _, d := range drifts {
			klog.InfoS("Repaired rules", "family", r.Family(), "table", d.Table, "object", d.Object, "chain", d.Chain, "drift", d.What)
			if err == nil {
				s.observer.Repaired(d.Object)
			}
		}
		drifted += len(drifts)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s rules: %w", r.Family(), err))
		}
	}
	res.Rules = errors.Join(errs...)
	res.Duration = time.Since(res.Started)
	s.observer.SyncFinished(res)
	klog.V(2).InfoS("Sync finished", "trigger", trigger, "duration", res.Duration, "repairs", len(repairs)+drifted, "ok", res.Err() == nil)
	return res.Err()
}

// Debounce of event-triggered verifications: one runs once events have
// been quiet for debounceQuiet, and at the latest debounceMax after the
// first event of a burst, so that kube-proxy writing thousands of rules
// costs one verification, and a change amid constant churn is still
// repaired within debounceMax plus the verification itself.
const (
	debounceQuiet = 10 * time.Millisecond
	debounceMax   = 100 * time.Millisecond
)

// Run syncs at once, then whenever events report a change that may concern
// us (debounced), and every interval, until ctx is done. Failures are
// logged and retried at the next trigger; they never end the loop. A sync
// in progress when ctx is done runs to its end, so that a signal never
// cuts a write short. events may be nil.
func (s *Sidecar) Run(ctx context.Context, interval time.Duration, events <-chan Trigger) {
	failures := 0
	sync := func(t Trigger) {
		err := s.verify(context.WithoutCancel(ctx), t)
		switch {
		case err != nil:
			failures++
			klog.ErrorS(err, "Sync failed; retrying", "trigger", t, "consecutiveFailures", failures, "lockHeld", IsLockHeld(err), "retryIn", interval)
		case failures > 0:
			klog.InfoS("Sync succeeded again", "afterFailures", failures)
			failures = 0
		}
	}
	sync(TriggerStartup)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	d := debounce{quiet: debounceQuiet, max: debounceMax}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			d.take() // this sync covers whatever is pending
			timer.Stop()
			sync(TriggerInterval)
		case t := <-events:
			d.add(time.Now(), t)
			wait, _ := d.due(time.Now())
			timer.Reset(wait)
		case <-timer.C:
			if wait, pending := d.due(time.Now()); pending && wait > 0 {
				timer.Reset(wait)
			} else if pending {
				sync(d.take())
			}
		}
	}
}

// debounce coalesces bursts of triggers into one verification.
type debounce struct {
	quiet, max time.Duration
	// first and last are the times of the first and latest trigger of the
	// pending burst; first is zero when nothing is pending.
	first, last time.Time
	trigger     Trigger // of the first
}

func (d *debounce) add(now time.Time, t Trigger) {
	if d.first.IsZero() {
		d.first, d.trigger = now, t
	}
	d.last = now
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

// take ends the pending burst and returns its first trigger.
func (d *debounce) take() Trigger {
	t := d.trigger
	d.first, d.last, d.trigger = time.Time{}, time.Time{}, ""
	return t
}

// Cleanup removes our jumps and chains from every family, then our address,
// and the link if this process created it. It tries every step and joins
// the errors.
func (s *Sidecar) Cleanup(ctx context.Context) error {
	var errs []error
	for _, r := range s.rules {
		if err := r.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s rules: %w", r.Family(), err))
		}
	}
	if err := s.address.Cleanup(); err != nil {
		errs = append(errs, fmt.Errorf("address: %w", err))
	}
	return errors.Join(errs...)
}
