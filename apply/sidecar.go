package apply

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Sidecar keeps the address and, optionally, the rules of every address
// family in place.
type Sidecar struct {
	address *Address
	rules   []*Rules
	// Stats counts syncs; the Rules count their own writes into IPTables.
	Stats SyncStats
	// IPTables counts iptables-restore runs of every Rules made with it.
	IPTables *Stats
}

// SyncStats counts the sidecar's syncs. Safe for concurrent use.
type SyncStats struct {
	Succeeded atomic.Int64
	Failed    atomic.Int64
}

// NewSidecar returns a Sidecar that keeps address and, if rules is not
// empty, the rules.
func NewSidecar(address *Address, rules []*Rules, iptables *Stats) *Sidecar {
	return &Sidecar{address: address, rules: rules, IPTables: iptables}
}

// Sync ensures the address, then the rules of each family, once. A failure
// of one does not stop the others; the errors are joined.
func (s *Sidecar) Sync(ctx context.Context) error {
	start := time.Now()
	var errs []error
	repairs, err := s.address.Ensure()
	for _, r := range repairs {
		klog.InfoS("Repaired address", "object", r.Kind.Object(), "repair", r.String())
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("address: %w", err))
	}
	drifted := 0
	for _, r := range s.rules {
		drifts, err := r.Sync(ctx)
		for _, d := range drifts {
			klog.InfoS("Repaired rules", "family", r.Family(), "table", d.Table, "object", d.Object, "chain", d.Chain, "drift", d.What)
		}
		drifted += len(drifts)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s rules: %w", r.Family(), err))
		}
	}
	err = errors.Join(errs...)
	if err != nil {
		s.Stats.Failed.Add(1)
	} else {
		s.Stats.Succeeded.Add(1)
	}
	klog.V(2).InfoS("Sync finished", "duration", time.Since(start), "repairs", len(repairs)+drifted, "ok", err == nil)
	return err
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
