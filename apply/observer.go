package apply

import (
	"errors"
	"net/netip"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Observer is told what the sidecar does, for metrics and health checks.
// Its methods are called from the sync goroutine; they must be quick and
// must not block.
type Observer interface {
	// SyncFinished reports one sync.
	SyncFinished(SyncResult)
	// Repaired reports one object put back.
	Repaired(Object)
	// RestoreRan reports one iptables-restore and its error, nil on
	// success; IsLockHeld(err) tells a write that gave up waiting for the
	// xtables lock.
	RestoreRan(family render.Family, err error)
	// BackendChosen reports the iptables backend in use for a family.
	BackendChosen(family render.Family, backend Backend)
	// Verification reports that a sync starts, and why.
	Verification(Trigger)
	// VerificationSkipped reports a family's rules not read because
	// nothing can have changed.
	VerificationSkipped(SkipReason)
	// UntrackedDNAT reports connections that were DNATed from original
	// (a Service ClusterIP, say) to one of our addresses, to, while our
	// rules untrack their replies: they cannot be answered. n counts the
	// connections seen for the first time.
	UntrackedDNAT(original, to netip.AddrPort, n int)
}

// Object is a kind of thing the sidecar keeps in place and repairs.
type Object string

// The objects.
const (
	ObjectAddress Object = "address"
	ObjectLink    Object = "link"
	ObjectChain   Object = "chain" // one of our chains and its rules
	ObjectJump    Object = "jump"  // a rule in a built-in chain jumping to ours
)

// Objects lists every Object, for metrics that show each from the start.
var Objects = []Object{ObjectAddress, ObjectLink, ObjectChain, ObjectJump}

// Triggers lists every Trigger, for metrics that show each from the start.
var Triggers = []Trigger{TriggerStartup, TriggerInterval, TriggerAddress, TriggerLink, TriggerNFTables, TriggerLegacyChange, TriggerRetry}

// SkipReason says why a family's rules were not read.
type SkipReason string

// SkipGenerationUnchanged: the nftables generation has not moved since a
// sync found everything in place.
const SkipGenerationUnchanged SkipReason = "generation_unchanged"

// SkipLegacyUnchanged: the info of each legacy table we use (entry count,
// size, chain offsets) is as it was when a sync found everything in place.
const SkipLegacyUnchanged SkipReason = "legacy_unchanged"

// SkipReasons lists every SkipReason.
var SkipReasons = []SkipReason{SkipGenerationUnchanged, SkipLegacyUnchanged}

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
