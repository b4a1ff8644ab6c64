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
	klog.V(2).InfoS("Sync finished", "duration", res.Duration, "repairs", len(repairs)+drifted, "ok", res.Err() == nil)
	return res.Err()
}

// Run syncs at once and then every interval until ctx is done. Failures are
// logged and retried at the next tick; they never end the loop. A sync in
// progress when ctx is done runs to its end, so that a signal never cuts a
// write short.
func (s *Sidecar) Run(ctx context.Context, interval time.Duration) {
	failures := 0
	sync := func() {
		err := s.Sync(context.WithoutCancel(ctx))
		switch {
		case err != nil:
			failures++
			klog.ErrorS(err, "Sync failed; retrying", "consecutiveFailures", failures, "lockHeld", IsLockHeld(err), "retryIn", interval)
		case failures > 0:
			klog.InfoS("Sync succeeded again", "afterFailures", failures)
			failures = 0
		}
	}
	sync()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			sync()
		}
	}
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
