package apply

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// netlinkHandle is the narrow seam over netlink; *rtnl satisfies it.
type netlinkHandle interface {
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetUp(link netlink.Link) error
	LinkSetAlias(link netlink.Link, alias string) error
	// AddrList lists addresses with their protocol; link nil: all links.
	AddrList(link netlink.Link, family int) ([]ifAddr, error)
	// AddrAdd adds, or replaces, an address with the protocol proto.
	AddrAdd(link netlink.Link, addr *netlink.Addr, proto uint8) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
}

// RepairKind names one kind of change Ensure makes.
type RepairKind string

// The changes Ensure can make.
const (
	// RepairLinkCreated: the link was missing and a dummy link was created.
	RepairLinkCreated RepairKind = "link created"
	// RepairLinkUp: the link was down and was set up.
	RepairLinkUp RepairKind = "link set up"
	// RepairAddressAdded: the host prefix was missing on the link and was added.
	RepairAddressAdded RepairKind = "address added"
	// RepairAddressRemoved: the managed IP was removed from a link, either
	// from another link or, with a wrong prefix length or scope, from the
	// managed link.
	RepairAddressRemoved RepairKind = "address removed"
	// RepairAddressMarked: a managed address without our mark (added by an
	// earlier version, or by hand) was given AddressProtocol.
	RepairAddressMarked RepairKind = "address marked"
	// RepairStaleRemoved: an address of ours that is no longer configured
	// was removed.
	RepairStaleRemoved RepairKind = "stale address removed"
	// RepairLinkDeleted: teardown deleted the dummy link the sidecar created.
	RepairLinkDeleted RepairKind = "link deleted"
)

// Object returns the kind of object the repair changed: ObjectLink or
// ObjectAddress.
func (k RepairKind) Object() Object {
	if k == RepairLinkCreated || k == RepairLinkUp || k == RepairLinkDeleted {
		return ObjectLink
	}
	return ObjectAddress
}

// Repair is one change Ensure made to converge.
type Repair struct {
	Kind RepairKind
	// Link is the name of the link that was changed.
	Link string
	// Prefix is the address that was added or removed; it is the zero
	// Prefix for link repairs.
	Prefix netip.Prefix
}

// String returns, for example, "address added 10.96.0.2/32 on lo".
func (r Repair) String() string {
	if r.Kind.Object() == ObjectLink {
		return fmt.Sprintf("%s %s", r.Kind, r.Link)
	}
	return fmt.Sprintf("%s %s on %s", r.Kind, r.Prefix, r.Link)
}

// Repairs lists the changes one Ensure made, in order; it is empty when the
// state had already converged.
type Repairs []Repair

// String joins the repairs with ", ".
func (rs Repairs) String() string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ", ")
}

// Address keeps addresses on one interface.
//
// Each address is kept as a host prefix (/32 or /128) with universe scope;
// host scope would keep Cilium from masquerading traffic from it. IPv6
// addresses are added with IFA_F_NODAD so that they are usable at once.
//
// Every address it adds carries AddressProtocol (IFA_PROTO), the kernel's
// record of who added an address: an address with that mark is ours
// whatever --ip-address says now, so Sweep removes the ones no longer
// configured and Cleanup removes them all. An address without the mark is
// never removed, with two exceptions that the configuration itself names:
// a configured address on the managed link with the wrong prefix length or
// scope, and a configured address on lo (where the sidecar kept it by
// default), both moved to the managed link. A configured address that
// another agent holds on another link is left there and logged; on
// kube-ipvs0 (kube-proxy in IPVS mode, where IPVS takes the packets to it
// whatever our rules say) it is an error, since the sidecar cannot serve it.
//
// If the interface does not exist, Address creates a dummy link with its
// name and LinkAlias as its alias: only a link with that alias (or one this
// Address created) is deleted by Cleanup, or set up again when found down
// (loopback is set up too). Any other link that is down is left alone.
//
// An Address is safe for concurrent use.
type Address struct {
	h        netlinkHandle
	close    func()
	iface    string
	prefixes []netip.Prefix
	// proc reads a file below /proc; a field so tests can fake it.
	proc func(path string) ([]byte, error)
	// warn logs a condition the sidecar leaves as it is; a field so tests
	// can observe it.
	warn func(msg string, keysAndValues ...any)
	// marks is whether the kernel keeps IFA_PROTO (Linux 5.18+); without
	// it, no address can be recognised as ours once configured no more.
	marks bool

	mu         sync.Mutex
	closed     bool // Close was called
	created    bool // the link was created by this Address
	warnedDown bool // the current down episode of the link was logged
	// warned holds the conditions logged by warnOnce that still hold.
	warned map[string]bool
}

// NewAddress returns an Address that keeps addrs on the interface iface
// through h. addrs must be valid: distinct, neither unspecified nor zoned.
func NewAddress(h netlinkHandle, iface string, addrs []netip.Addr) *Address {
	prefixes := make([]netip.Prefix, 0, len(addrs))
	for _, ip := range addrs {
		ip = ip.Unmap()
		prefixes = append(prefixes, netip.PrefixFrom(ip, ip.BitLen()))
	}
	return &Address{
		h:        h,
		close:    func() {},
		iface:    iface,
		prefixes: prefixes,
		proc:     os.ReadFile,
		warn:     klog.InfoS,
		marks:    kernelAtLeast(5, 18),
		warned:   map[string]bool{},
	}
}

// NewAddressManager returns an Address working in the current network
// namespace. Call Close when done with it.
func NewAddressManager(iface string, addrs []netip.Addr) (*Address, error) {
	return NewAddressAt(netns.None(), iface, addrs)
}

// NewAddressAt returns an Address working in the network namespace ns, or
// the current one for netns.None(). Call Close when done with it.
func NewAddressAt(ns netns.NsHandle, iface string, addrs []netip.Addr) (*Address, error) {
	h, err := newRTNL(ns)
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	a := NewAddress(h, iface, addrs)
	a.close = h.Close
	if !a.marks {
		a.warn("This kernel does not record who added an address (IFA_PROTO needs Linux 5.18): addresses of ours that are no longer configured cannot be recognised, and stay until removed by hand",
			"mark", AddressProtocol)
	}
	return a, nil
}

// errClosed is returned by Ensure and Cleanup after Close. A closed
// handle would silently fall back to the current network namespace.
var errClosed = errors.New("address manager is closed")

// Close releases the netlink handle opened by NewAddressManager or
// NewAddressAt; Ensure and Cleanup fail afterwards. It changes nothing on the
// system.
func (a *Address) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.closed {
		a.closed = true
		a.close()
	}
}

// Ensure converges the link and its addresses and reports what it changed.
// When nothing needs repair it only reads: one listing of the link and one
// of the node's addresses.
//
//  1. The link is created as a dummy link if missing, and set up if it is
//     down and is ours or a loopback.
//  2. Each host prefix is added to the link if missing, with our mark; a
//     configured address found there without it is given it. The same IP
//     on the link with another prefix length or scope is removed first.
//  3. The same IP is removed from other links where it is ours or on lo,
//     so that moving the address from one interface to another leaves no
//     duplicate. Where another agent holds it, it stays (logged once);
//     on kube-ipvs0 the address is an error and is not added.
//
// An IPv6 address on a node where IPv6 is disabled is skipped with a
// warning, as long as an address of the other family is served: see
// FamilyUnavailableError.
//
// The returned Repairs hold the changes made, also when an error is
// returned; errors name the link and address involved, and the cause where
// it is known (see AddressError).
func (a *Address) Ensure() (Repairs, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil, errClosed
	}

	var repairs Repairs
	link, err := a.ensureLink(&repairs)
	if err != nil {
		return repairs, err
	}
	all, err := a.addrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return repairs, fmt.Errorf("listing addresses: %w", err)
	}
	var errs []error
	unavailable := 0
	for _, p := range a.prefixes {
		err := a.ensurePrefix(link, p, all, &repairs)
		var fu *FamilyUnavailableError
		if errors.As(err, &fu) {
			unavailable++
			a.warnOnce("family "+fu.Family, "Not serving an address: its family is unavailable on this node", "address", p.Addr(), "reason", fu.Reason)
			continue
		}
		a.clearWarning("family " + familyName(p))
		if err != nil {
			errs = append(errs, err)
		}
	}
	if unavailable == len(a.prefixes) {
		// Nothing at all can be served: that is a failure, not a skip.
		return repairs, fmt.Errorf("no address can be served: %w", a.familyUnavailable(a.prefixes[0]))
	}
	return repairs, errors.Join(errs...)
}

func (a *Address) ensureLink(repairs *Repairs) (netlink.Link, error) {
	link, err := a.h.LinkByName(a.iface)
	if isLinkNotFound(err) {
		if err := a.h.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: a.iface}}); err != nil {
			return nil, a.explain(fmt.Errorf("creating dummy link %s: %w", a.iface, err), netip.Prefix{})
		}
		a.created = true
		*repairs = append(*repairs, Repair{Kind: RepairLinkCreated, Link: a.iface})
		link, err = a.h.LinkByName(a.iface)
		if err == nil {
			// The alias tells a later run, and a teardown, that the link
			// is ours (RTM_NEWLINK does not take one).
			if err := a.h.LinkSetAlias(link, LinkAlias); err != nil {
				return nil, a.explain(fmt.Errorf("marking dummy link %s as ours (alias %s): %w", a.iface, LinkAlias, err), netip.Prefix{})
			}
		}
	}
	if err != nil {
		return nil, a.explain(fmt.Errorf("getting link %s: %w", a.iface, err), netip.Prefix{})
	}

	attrs := link.Attrs()
	switch {
	case attrs.Flags&net.FlagUp != 0:
		a.warnedDown = false
	case a.ours(link) || attrs.Flags&net.FlagLoopback != 0:
		if err := a.h.LinkSetUp(link); err != nil {
			return nil, a.explain(fmt.Errorf("setting link %s up: %w", a.iface, err), netip.Prefix{})
		}
		*repairs = append(*repairs, Repair{Kind: RepairLinkUp, Link: a.iface})
	case !a.warnedDown:
		a.warn("Link is down and was not created by this sidecar; leaving it down, its addresses will not be reachable",
			"link", a.iface)
		a.warnedDown = true
	}
	return link, nil
}

// ours reports whether link is a link the sidecar created: in this
// process, or in an earlier one that gave it our alias.
func (a *Address) ours(link netlink.Link) bool {
	return a.created || link.Attrs().Alias == LinkAlias
}

// ensurePrefix puts p on link; all is the node's addresses as listed at
// the start of the sync.
func (a *Address) ensurePrefix(link netlink.Link, p netip.Prefix, all []ifAddr, repairs *Repairs) error {
	index := link.Attrs().Index
	var present *ifAddr
	var wrong, elsewhere []ifAddr
	for i, x := range all {
		got, ok := prefixOf(x.Addr)
		if !ok || got.Addr() != p.Addr() {
			continue
		}
		switch {
		case x.LinkIndex != index:
			elsewhere = append(elsewhere, x)
		case got == p && x.Scope == int(netlink.SCOPE_UNIVERSE):
			present = &all[i]
		default:
			wrong = append(wrong, x)
		}
	}

	// Resolve the other links first: an address kube-proxy's IPVS holds
	// cannot be served, and is not added here at all.
	type holder struct {
		x    ifAddr
		link netlink.Link
	}
	var move []holder
	var errs []error
	for _, x := range elsewhere {
		other, err := a.h.LinkByIndex(x.LinkIndex)
		if isLinkNotFound(err) {
			continue // the link and its addresses are gone
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("getting link %d holding %s: %w", x.LinkIndex, p, err))
			continue
		}
		name := other.Attrs().Name
		switch {
		case name == IPVSLink:
			return &AddressError{Addr: p.Addr(), Link: name, Cause: CauseIPVS,
				Err: fmt.Errorf("%s is on %s: kube-proxy in IPVS mode serves it, and IPVS takes its packets whatever the rules say; it cannot be intercepted, remove it from --ip-address", p.Addr(), IPVSLink)}
		case x.Proto == AddressProtocol || other.Attrs().Flags&net.FlagLoopback != 0:
			move = append(move, holder{x, other})
		default:
			a.warnOnce("foreign "+p.String()+" "+name, "Address is also on a link another agent manages; leaving it there",
				"address", p.Addr(), "link", name, "proto", x.Proto)
		}
	}

	if present == nil || len(wrong) > 0 {
		if err := a.familyUnavailable(p); err != nil {
			return err
		}
	}
	for _, x := range wrong {
		got, _ := prefixOf(x.Addr)
		if err := a.h.AddrDel(link, &x.Addr); err != nil {
			return a.explain(fmt.Errorf("removing %s (scope %d) from %s before adding %s: %w", got, x.Scope, a.iface, p, err), p)
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressRemoved, Link: a.iface, Prefix: got})
	}
	switch {
	case present == nil:
		if err := a.h.AddrAdd(link, hostAddr(p), AddressProtocol); err != nil {
			return a.explain(fmt.Errorf("adding %s to %s: %w", p, a.iface, err), p)
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressAdded, Link: a.iface, Prefix: p})
	case present.Proto != AddressProtocol && a.marks:
		if err := a.h.AddrAdd(link, hostAddr(p), AddressProtocol); err != nil {
			return a.explain(fmt.Errorf("marking %s on %s as ours: %w", p, a.iface, err), p)
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressMarked, Link: a.iface, Prefix: p})
	}

	for _, m := range move {
		got, _ := prefixOf(m.x.Addr)
		name := m.link.Attrs().Name
		if err := a.h.AddrDel(m.link, &m.x.Addr); err != nil {
			errs = append(errs, a.explain(fmt.Errorf("removing %s from other link %s: %w", got, name, err), p))
			continue
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressRemoved, Link: name, Prefix: got})
	}
	return errors.Join(errs...)
}

// Sweep removes every address of ours (marked with AddressProtocol, on any
// link) that is no longer configured, and reports each. It runs at start
// and at each interval sync, not on every address event: during a rolling
// update that changes --ip-address, the old pod still keeps the old
// address, and removing it on its every re-add would make the two loop.
func (a *Address) Sweep() (Repairs, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil, errClosed
	}
	if !a.marks {
		return nil, nil
	}
	all, err := a.addrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	var repairs Repairs
	var errs []error
	for _, x := range all {
		got, ok := prefixOf(x.Addr)
		if !ok || x.Proto != AddressProtocol || a.manages(got) {
			continue
		}
		link, err := a.h.LinkByIndex(x.LinkIndex)
		if isLinkNotFound(err) || (err == nil && link.Attrs().Name == IPVSLink) {
			continue // gone, or kube-proxy's whatever it carries
		}
		if err == nil {
			err = a.h.AddrDel(link, &x.Addr)
		}
		name := fmt.Sprint(x.LinkIndex)
		if link != nil {
			name = link.Attrs().Name
		}
		if err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("removing stale address %s from %s: %w", got, name, err))
			continue
		}
		repairs = append(repairs, Repair{Kind: RepairStaleRemoved, Link: name, Prefix: got})
	}
	return repairs, errors.Join(errs...)
}

// Cleanup removes every address of ours: the configured ones from the
// link, and those carrying our mark from any link (whatever --ip-address
// says now); then it deletes the link if it is ours (created by this
// process or carrying LinkAlias). Loopback and links of others are never
// deleted, and no address without our mark is removed from another link.
// It attempts every step, returns what it removed and all errors joined,
// and is idempotent.
func (a *Address) Cleanup() (Repairs, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil, errClosed
	}

	var removed Repairs
	var errs []error
	all, err := a.addrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		errs = append(errs, fmt.Errorf("listing addresses for cleanup: %w", err))
	}
	link, err := a.h.LinkByName(a.iface)
	switch {
	case isLinkNotFound(err):
		a.created, link = false, nil
	case err != nil:
		errs = append(errs, fmt.Errorf("getting link %s for cleanup: %w", a.iface, err))
	}
	for _, x := range all {
		got, ok := prefixOf(x.Addr)
		if !ok {
			continue
		}
		onLink := link != nil && x.LinkIndex == link.Attrs().Index
		if x.Proto != AddressProtocol && !(onLink && a.manages(got)) {
			continue
		}
		holder := link
		if !onLink {
			holder, err = a.h.LinkByIndex(x.LinkIndex)
			if isLinkNotFound(err) {
				continue
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("getting link %d holding %s for cleanup: %w", x.LinkIndex, got, err))
				continue
			}
		}
		name := holder.Attrs().Name
		if name == IPVSLink {
			continue // kube-proxy's, whatever it carries
		}
		if err := a.h.AddrDel(holder, &x.Addr); err != nil {
			if !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("removing %s from %s: %w", got, name, err))
			}
			continue
		}
		removed = append(removed, Repair{Kind: RepairAddressRemoved, Link: name, Prefix: got})
	}

	if link != nil && a.ours(link) && link.Attrs().Flags&net.FlagLoopback == 0 {
		if err := a.h.LinkDel(link); err != nil && !isLinkNotFound(err) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("deleting dummy link %s: %w", a.iface, err))
		} else {
			a.created = false
			removed = append(removed, Repair{Kind: RepairLinkDeleted, Link: a.iface})
		}
	}
	return removed, errors.Join(errs...)
}

// warnOnce logs msg once while the condition named key holds.
func (a *Address) warnOnce(key, msg string, keysAndValues ...any) {
	if !a.warned[key] {
		a.warned[key] = true
		a.warn(msg, keysAndValues...)
	}
}

// clearWarning forgets that the condition named key was logged: it no
// longer holds.
func (a *Address) clearWarning(key string) { delete(a.warned, key) }

// manages reports whether p is one of the host prefixes kept by a.
func (a *Address) manages(p netip.Prefix) bool {
	for _, q := range a.prefixes {
		if p == q {
			return true
		}
	}
	return false
}

// addrList lists addresses, retrying a dump the kernel interrupted because
// the addresses changed meanwhile.
func (a *Address) addrList(link netlink.Link, family int) ([]ifAddr, error) {
	const attempts = 3
	var err error
	for range attempts {
		var addrs []ifAddr
		addrs, err = a.h.AddrList(link, family)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return addrs, err
		}
	}
	return nil, err
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// prefixOf returns the address and prefix length of x.
func prefixOf(x netlink.Addr) (netip.Prefix, bool) {
	if x.IPNet == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(x.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := x.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

// hostAddr is the netlink form of p: universe scope, and no duplicate
// address detection for IPv6.
func hostAddr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{
		IPNet: &net.IPNet{
			IP:   p.Addr().AsSlice(),
			Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
		},
		Scope: int(netlink.SCOPE_UNIVERSE),
	}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}
