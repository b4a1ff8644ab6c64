package apply

import (
	"errors"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Observer is told what the sidecar does, for metrics and health checks.
// Its methods are called from the sync goroutine; they must be quick and
// must not block.
type Observer interface {
	// SyncFinished reports one sync.
	SyncFinished(SyncResult)
	// Repaired reports one object put back: "address", "link", "chain" or
	// "jump".
	Repaired(object string)
	// RestoreRan reports one iptables-restore and its error, nil on
	// success; IsLockHeld(err) tells a write that gave up waiting for the
	// xtables lock.
	RestoreRan(family render.Family, err error)
	// BackendChosen reports the iptables backend in use for a family.
	BackendChosen(family render.Family, backend Backend)
	// Verification reports that a sync starts, and why: one of the
	// Trigger values.
	Verification(trigger string)
	// VerificationSkipped reports a family's rules not read because
	// nothing can have changed; reason is "generation_unchanged".
	VerificationSkipped(reason string)
	// UntrackedDNAT reports connections that were DNATed from original
	// (a Service ClusterIP, say) to one of our addresses, to, while our
	// rules untrack their replies: they cannot be answered. n counts the
	// connections seen for the first time.
	UntrackedDNAT(original, to netip.AddrPort, n int)
}

// SyncResult is what one sync found and did.
type SyncResult struct {
	Started  time.Time
	Duration time.Duration
	// Address is nil when every address is in place at the end of the sync.
	Address error
	// Rules is nil when every family's rules are in place at the end of
	// the sync, or when rules are not managed.
	Rules error
}

// Err is the sync's error, nil if it succeeded.
func (r SyncResult) Err() error { return errors.Join(r.Address, r.Rules) }

// Counts is an Observer that counts, for tests and logs. The zero value is
// ready and safe for concurrent use.
type Counts struct {
	Verifications   atomic.Int64
	Skipped         atomic.Int64
	SyncsSucceeded  atomic.Int64
	SyncsFailed     atomic.Int64
	Repairs         atomic.Int64
	Restores        atomic.Int64
	RestoreFailures atomic.Int64
	LockHeld        atomic.Int64
	UntrackedDNATs  atomic.Int64
}

func (c *Counts) SyncFinished(r SyncResult) {
	if r.Err() != nil {
		c.SyncsFailed.Add(1)
	} else {
		c.SyncsSucceeded.Add(1)
	}
}

func (c *Counts) Repaired(string) { c.Repairs.Add(1) }

func (c *Counts) RestoreRan(_ render.Family, err error) {
	c.Restores.Add(1)
	if err != nil {
		c.RestoreFailures.Add(1)
	}
	if IsLockHeld(err) {
		c.LockHeld.Add(1)
	}
}

func (c *Counts) BackendChosen(render.Family, Backend) {}

func (c *Counts) Verification(string) { c.Verifications.Add(1) }

func (c *Counts) VerificationSkipped(string) { c.Skipped.Add(1) }

func (c *Counts) UntrackedDNAT(_, _ netip.AddrPort, n int) { c.UntrackedDNATs.Add(int64(n)) }

// Observers fans every call out to each Observer in turn.
type Observers []Observer

func (os Observers) SyncFinished(r SyncResult) {
	for _, o := range os {
		o.SyncFinished(r)
	}
}

func (os Observers) Repaired(object string) {
	for _, o := range os {
		o.Repaired(object)
	}
}

func (os Observers) RestoreRan(f render.Family, err error) {
	for _, o := range os {
		o.RestoreRan(f, err)
	}
}

func (os Observers) BackendChosen(f render.Family, b Backend) {
	for _, o := range os {
		o.BackendChosen(f, b)
	}
}

func (os Observers) Verification(trigger string) {
	for _, o := range os {
		o.Verification(trigger)
	}
}

func (os Observers) VerificationSkipped(reason string) {
	for _, o := range os {
		o.VerificationSkipped(reason)
	}
}

func (os Observers) UntrackedDNAT(original, to netip.AddrPort, n int) {
	for _, o := range os {
		o.UntrackedDNAT(original, to, n)
	}
}
