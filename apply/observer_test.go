package apply

import (
	"net/netip"
	"sync/atomic"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Counts is an Observer that counts, for the tests. The zero value is
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

func (c *Counts) Repaired(Object) { c.Repairs.Add(1) }

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

func (c *Counts) Verification(Trigger) { c.Verifications.Add(1) }

func (c *Counts) VerificationSkipped(SkipReason) { c.Skipped.Add(1) }

func (c *Counts) UntrackedDNAT(_, _ netip.AddrPort, n int) { c.UntrackedDNATs.Add(int64(n)) }
