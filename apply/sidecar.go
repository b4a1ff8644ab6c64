package apply

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
)

// Sidecar keeps the address and, optionally, the rules of every address
// family in place.
type Sidecar struct {
	clock    clock.WithTicker
	address  *Address
	rules    []*Rules
	observer Observer
	// retired are Rules for the families no configured address belongs
	// to: chains of ours left there by an earlier configuration are
	// removed at the first full sync and by Cleanup. retiredClean is set
	// once they were.
	retired      []*Rules
	retiredClean bool
	// dnat, when set, looks for the broken setup at every interval sync of
	// the daemon (see CheckDNAT).
	dnat dnatChecker
	// dnatUnfilteredLogged is set once the kernel's refusal to filter the
	// conntrack dumps was logged.
	dnatUnfilteredLogged bool
}

// dnatChecker finds connections DNATed into our addresses whose replies
// our rules untrack; *DNATCheck satisfies it.
type dnatChecker interface {
	Check(ctx context.Context) ([]DNATFinding, error)
	Unfiltered() error
}

// CheckDNAT has the daemon look, once per interval, for connections that
// kube-proxy (or anything) DNATed into one of our addresses while our
// rules untrack their replies: they fail, and the cure is a configuration
// change, so each is logged as a warning that names the original
// destination and the fix, and counted. Readiness is not changed: direct
// clients are still served. Set it only where the rules are managed.
func (s *Sidecar) CheckDNAT(c dnatChecker) { s.dnat = c }

// checkDNAT runs the check CheckDNAT set, if any.
func (s *Sidecar) checkDNAT(ctx context.Context) {
	if s.dnat == nil || ctx.Err() != nil {
		return // not asked for, or stopping
	}
	findings, err := s.dnat.Check(ctx)
	if ctx.Err() != nil {
		return // cut short by the signal that stops the daemon
	}
	if u := s.dnat.Unfiltered(); u != nil && !s.dnatUnfilteredLogged {
		klog.InfoS("Reading the conntrack table in process", "reason", u.Error())
		s.dnatUnfilteredLogged = true
	}
	if err != nil {
		klog.ErrorS(err, "Looking for connections DNATed into our addresses failed; trying again at the next interval")
		return
	}
	for _, f := range findings {
		klog.InfoS("WARNING: connections DNATed into our address fail, because our rules untrack their replies; list the original destination in --ip-address too (interception), or run without --setup-iptables",
			"originalDestination", f.Original, "dnatTo", f.To, "newConnections", f.New, "exampleClient", f.Example)
		s.observer.UntrackedDNAT(f.Original, f.To, f.New)
	}
}

// NewSidecar returns a Sidecar that keeps address and, if rules is not
// empty, the rules, and reports what it does to o.
func NewSidecar(address *Address, rules []*Rules, o Observer) *Sidecar {
	return &Sidecar{clock: clock.RealClock{}, address: address, rules: rules, observer: o}
}

// Retire has the sidecar remove our chains from the families of retired
// (built from render.Chains) at its first full sync, and at Cleanup: a
// family whose addresses were all dropped from --ip-address keeps nothing
// of ours.
func (s *Sidecar) Retire(retired ...*Rules) { s.retired = append(s.retired, retired...) }

// Sync ensures the address, then the rules of each family, once. A failure
// of one does not stop the others; the errors are joined.
func (s *Sidecar) Sync(ctx context.Context) error {
	return s.verify(ctx, TriggerStartup, everything)
}

// scope is what a verification checks: the configured addresses and the
// link, the rules, and whether addresses of ours that are no longer
// configured are looked for (see Address.Sweep).
type scope struct{ address, rules, stale bool }

var everything = scope{address: true, rules: true, stale: true}

// scopeOf is what a trigger may concern: an address or link event only the
// address and link, an nftables event or a legacy table's change only the
// rules, anything else all.
func scopeOf(t Trigger) scope {
	switch t {
	case TriggerAddress, TriggerLink:
		return scope{address: true}
	case TriggerNFTables, TriggerLegacyChange:
		return scope{rules: true}
	}
	return everything
}

func (a scope) or(b scope) scope {
	return scope{a.address || b.address, a.rules || b.rules, a.stale || b.stale}
}

// String lists what the scope checks: "address,rules,stale".
func (a scope) String() string {
	var parts []string
	for _, p := range []struct {
		on   bool
		name string
	}{{a.address, "address"}, {a.rules, "rules"}, {a.stale, "stale"}} {
		if p.on {
			parts = append(parts, p.name)
		}
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ",")
}

// verify syncs what sc names once.
func (s *Sidecar) verify(ctx context.Context, trigger Trigger, sc scope) error {
	s.observer.Verification(trigger)
	res := SyncResult{Started: s.clock.Now()}
	var repairs Repairs
	if sc.address {
		var err error
		repairs, err = s.address.Ensure()
		for _, r := range repairs {
			klog.InfoS("Repaired address", "object", r.Kind.Object(), "repair", r.String())
			s.observer.Repaired(r.Kind.Object())
		}
		if err != nil {
			res.Address = fmt.Errorf("address: %w", err)
		}
	}
	if sc.stale {
		stale, err := s.address.Sweep()
		for _, r := range stale {
			klog.InfoS("Removed an address of ours that is no longer configured", "address", r.Prefix, "link", r.Link)
			s.observer.Repaired(r.Kind.Object())
		}
		repairs = append(repairs, stale...)
		if err != nil {
			res.Address = errors.Join(res.Address, fmt.Errorf("address: %w", err))
		}
	}
	var errs []error
	drifted := 0
	for _, r := range s.rules {
		if !sc.rules {
			break
		}
		drifts, err := r.Sync(ctx)
		for _, d := range drifts {
			if err != nil {
				// The write may not have happened: never claim a repair.
				klog.InfoS("Rules drifted; repair failed", "family", r.Family(), "table", d.Table, "object", d.Object, "chain", d.Chain, "drift", d.What)
				continue
			}
			klog.InfoS("Repaired rules", "family", r.Family(), "table", d.Table, "object", d.Object, "chain", d.Chain, "drift", d.What)
			s.observer.Repaired(Object(d.Object))
		}
		drifted += len(drifts)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s rules: %w", r.Family(), err))
		}
	}
	if sc.stale && !s.retiredClean {
		clean := true
		for _, r := range s.retired {
			gone, err := r.Cleanup(ctx)
			for _, g := range gone {
				klog.InfoS("Removed rules of ours from a family no address is configured for", "family", r.Family(), "removed", g.String())
			}
			if err != nil {
				clean = false
				errs = append(errs, fmt.Errorf("removing our %s rules: %w", r.Family(), err))
			}
		}
		s.retiredClean = clean
	}
	res.Rules = errors.Join(errs...)
	res.Duration = s.clock.Since(res.Started)
	s.observer.SyncFinished(res)
	checked := sc
	checked.rules = sc.rules && len(s.rules) > 0
	klog.V(2).InfoS("Sync finished", "trigger", trigger, "duration", res.Duration, "repairs", len(repairs)+drifted, "ok", res.Err() == nil, "checked", checked.String())
	return res.Err()
}

// Run syncs at once, then whenever events report a change that may concern
// us (debounced), and every interval, until ctx is done; schedule decides
// when and what. Failures are logged and retried (see TriggerRetry); they
// never end the loop. A sync in progress when ctx is done runs to its end,
// so that a signal never cuts a write short. events may be nil.
func (s *Sidecar) Run(ctx context.Context, interval time.Duration, events <-chan Trigger) {
	p := newSchedule(interval, events != nil)
	timer := s.clock.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	sync := func(t Trigger, sc scope) {
		started := s.clock.Now()
		err := s.verify(context.WithoutCancel(ctx), t, sc)
		o := p.done(started, s.clock.Now(), sc, err)
		switch {
		case err != nil:
			klog.ErrorS(err, "Sync failed; retrying", "trigger", t, "consecutiveFailures", o.failures, "lockHeld", IsLockHeld(err), "retryIn", o.retryIn)
		case o.recovered > 0:
			klog.InfoS("Sync succeeded again", "afterFailures", o.recovered)
		}
		switch {
		case o.released:
			klog.InfoS("Repairs stick again; verifying on events at once", "afterSyncs", o.recovered)
		case o.holding:
			klog.InfoS("Syncs keep failing; holding back verifications on events, longer each time, until one succeeds",
				"consecutiveSyncs", o.failures, "holdOff", o.holdOff, "maxHoldOff", interval)
		case o.holdOff > 0:
			klog.V(2).InfoS("Holding back verifications on events", "consecutiveSyncs", o.failures, "holdOff", o.holdOff)
		}
		if wait, pending := p.due(s.clock.Now()); pending {
			timer.Reset(wait)
		}
	}
	sync(p.startup())
	tick := s.clock.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
			timer.Stop()
			sync(p.tick(s.clock.Now()))
			s.checkDNAT(ctx)
		case t := <-events:
			if t == TriggerNFTables && !s.nftablesConcernsUs() {
				// Another agent's nftables change: our rules are not there.
				continue
			}
			if t == TriggerLegacyChange && !s.legacyConcernsUs() {
				// A legacy table changed, but our rules are kept with nft.
				continue
			}
			timer.Reset(p.event(s.clock.Now(), t))
		case <-timer.C():
			if t, sc, wait, run := p.fire(s.clock.Now()); run {
				sync(t, sc)
			} else if wait > 0 {
				timer.Reset(wait)
			}
		}
	}
}

// nftablesConcernsUs reports whether an nftables event may concern our
// rules: false once every family's rules are kept with the legacy
// backend, which nftables events never describe.
func (s *Sidecar) nftablesConcernsUs() bool {
	for _, r := range s.rules {
		if r.Backend() != BackendLegacy {
			return true
		}
	}
	return len(s.rules) == 0
}

// legacyConcernsUs reports whether a change to a legacy table may concern
// our rules: whether some family's rules are kept with the legacy backend
// (or the backend is not chosen yet).
func (s *Sidecar) legacyConcernsUs() bool {
	for _, r := range s.rules {
		if r.Backend() == BackendLegacy || r.Backend() == "" {
			return true
		}
	}
	return false
}

// Cleanup removes our jumps and chains from every family and both
// backends, then every address of ours, and the link if it is ours (see
// Address.Cleanup). It tries every step, and returns what it removed, one
// line each ("IPv4 nft raw chain APISERVER-PROXY-OUTPUT", "address
// 10.96.0.2/32 on lo"), and the errors joined.
func (s *Sidecar) Cleanup(ctx context.Context) ([]string, error) {
	var removed []string
	var errs []error
	for _, r := range append(slices.Clip(s.rules), s.retired...) {
		gone, err := r.Cleanup(ctx)
		for _, g := range gone {
			removed = append(removed, fmt.Sprintf("%s %s", r.Family(), g))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s rules: %w", r.Family(), err))
		}
	}
	gone, err := s.address.Cleanup()
	for _, g := range gone {
		if g.Kind == RepairLinkDeleted {
			removed = append(removed, "link "+g.Link)
			continue
		}
		removed = append(removed, fmt.Sprintf("address %s on %s", g.Prefix, g.Link))
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("address: %w", err))
	}
	return removed, errors.Join(errs...)
}
