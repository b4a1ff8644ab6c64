package apply

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// netlinkHandle is the narrow seam over vishvananda/netlink; *netlink.Handle
// satisfies it.
type netlinkHandle interface {
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetUp(link netlink.Link) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
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
)

// Object returns the kind of object the repair changed, "link" or
// "address", for use as a metric label.
func (k RepairKind) Object() string {
	if k == RepairLinkCreated || k == RepairLinkUp {
		return "link"
	}
	return "address"
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
	if r.Kind.Object() == "link" {
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
// If the interface does not exist, Address creates a dummy link with its
// name, and remembers in memory that it did: only such a link is deleted by
// Cleanup, or set up again when found down (loopback is set up too). Any
// other link that is down is left alone.
//
// An Address is safe for concurrent use.
type Address struct {
	h        netlinkHandle
	close    func()
	iface    string
	prefixes []netip.Prefix
	// warn logs that a link we may not touch is down; a field so tests can
	// observe it.
	warn func(msg string, keysAndValues ...any)

	mu         sync.Mutex
	closed     bool // Close was called
	created    bool // the link was created by this Address
	warnedDown bool // the current down episode of the link was logged
}

// NewAddress returns an Address that keeps addrs on the interface iface
// through h. addrs must be valid: at most one IPv4 and one IPv6 address,
// neither unspecified nor zoned.
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
		warn:     klog.InfoS,
	}
}

// NewAddressManager returns an Address working in the current network
// namespace. Call Close when done with it.
func NewAddressManager(iface string, addrs []netip.Addr) (*Address, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	a := NewAddress(h, iface, addrs)
	a.close = h.Close
	return a, nil
}

// NewAddressAt returns an Address working in the network namespace ns. Call
// Close when done with it.
func NewAddressAt(ns netns.NsHandle, iface string, addrs []netip.Addr) (*Address, error) {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle in network namespace %s: %w", ns, err)
	}
	a := NewAddress(h, iface, addrs)
	a.close = h.Close
	return a, nil
}

// errClosed is returned by Ensure and Cleanup after Close. A closed
// *netlink.Handle would silently fall back to the current network namespace.
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
// When nothing needs repair it only reads.
//
//  1. The link is created as a dummy link if missing, and set up if it is
//     down and was created by this Address or is a loopback.
//  2. Each host prefix is added to the link if missing. The same IP on the
//     link with another prefix length or scope is removed first.
//  3. The same IP is removed from every other link, so that moving the
//     address from one interface to another leaves no duplicate. No other
//     address is ever removed.
//
// The returned Repairs hold the changes made, also when an error is
// returned; errors name the link and address involved.
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
	var errs []error
	for _, p := range a.prefixes {
		if err := a.ensurePrefix(link, p, &repairs); err != nil {
			errs = append(errs, err)
		}
	}
	return repairs, errors.Join(errs...)
}

func (a *Address) ensureLink(repairs *Repairs) (netlink.Link, error) {
	link, err := a.h.LinkByName(a.iface)
	if isLinkNotFound(err) {
		if err := a.h.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: a.iface}}); err != nil {
			return nil, fmt.Errorf("creating dummy link %s: %w", a.iface, err)
		}
		a.created = true
		*repairs = append(*repairs, Repair{Kind: RepairLinkCreated, Link: a.iface})
		link, err = a.h.LinkByName(a.iface)
	}
	if err != nil {
		return nil, fmt.Errorf("getting link %s: %w", a.iface, err)
	}

	attrs := link.Attrs()
	switch {
	case attrs.Flags&net.FlagUp != 0:
		a.warnedDown = false
	case a.created || attrs.Flags&net.FlagLoopback != 0:
		if err := a.h.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("setting link %s up: %w", a.iface, err)
		}
		*repairs = append(*repairs, Repair{Kind: RepairLinkUp, Link: a.iface})
	case !a.warnedDown:
		a.warn("Link is down and was not created by this sidecar; leaving it down, its addresses will not be reachable",
			"link", a.iface)
		a.warnedDown = true
	}
	return link, nil
}

func (a *Address) ensurePrefix(link netlink.Link, p netip.Prefix, repairs *Repairs) error {
	all, err := a.addrList(nil, addrFamily(p))
	if err != nil {
		return fmt.Errorf("listing addresses to ensure %s on %s: %w", p, a.iface, err)
	}
	index := link.Attrs().Index
	present := false
	var wrong, elsewhere []netlink.Addr
	for _, x := range all {
		got, ok := prefixOf(x)
		if !ok || got.Addr() != p.Addr() {
			continue
		}
		switch {
		case x.LinkIndex != index:
			elsewhere = append(elsewhere, x)
		case got == p && x.Scope == int(netlink.SCOPE_UNIVERSE):
			present = true
		default:
			wrong = append(wrong, x)
		}
	}

	for _, x := range wrong {
		got, _ := prefixOf(x)
		if err := a.h.AddrDel(link, &x); err != nil {
			return fmt.Errorf("removing %s (scope %d) from %s before adding %s: %w", got, x.Scope, a.iface, p, err)
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressRemoved, Link: a.iface, Prefix: got})
	}
	if !present {
		if err := a.h.AddrAdd(link, hostAddr(p)); err != nil {
			return fmt.Errorf("adding %s to %s: %w", p, a.iface, err)
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressAdded, Link: a.iface, Prefix: p})
	}

	var errs []error
	for _, x := range elsewhere {
		got, _ := prefixOf(x)
		other, err := a.h.LinkByIndex(x.LinkIndex)
		if isLinkNotFound(err) {
			continue // the link and its addresses are gone
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("getting link %d holding %s: %w", x.LinkIndex, got, err))
			continue
		}
		name := other.Attrs().Name
		if err := a.h.AddrDel(other, &x); err != nil {
			errs = append(errs, fmt.Errorf("removing %s from other link %s: %w", got, name, err))
			continue
		}
		*repairs = append(*repairs, Repair{Kind: RepairAddressRemoved, Link: name, Prefix: got})
	}
	return errors.Join(errs...)
}

// Cleanup removes the managed addresses from the link and deletes the link
// if this Address created it; loopback and links that existed before are
// never deleted. It attempts every step, returns all errors joined, and is
// idempotent.
func (a *Address) Cleanup() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return errClosed
	}

	link, err := a.h.LinkByName(a.iface)
	if isLinkNotFound(err) {
		a.created = false
		return nil
	}
	if err != nil {
		return fmt.Errorf("getting link %s for cleanup: %w", a.iface, err)
	}

	var errs []error
	addrs, err := a.addrList(link, netlink.FAMILY_ALL)
	if err != nil {
		errs = append(errs, fmt.Errorf("listing addresses on %s for cleanup: %w", a.iface, err))
	}
	for _, x := range addrs {
		got, ok := prefixOf(x)
		if !ok || !a.manages(got) {
			continue
		}
		if err := a.h.AddrDel(link, &x); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("removing %s from %s: %w", got, a.iface, err))
		}
	}

	if a.created && link.Attrs().Flags&net.FlagLoopback == 0 {
		if err := a.h.LinkDel(link); err != nil && !isLinkNotFound(err) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("deleting dummy link %s: %w", a.iface, err))
		} else {
			a.created = false
		}
	}
	return errors.Join(errs...)
}

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
func (a *Address) addrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	const attempts = 3
	var err error
	for range attempts {
		var addrs []netlink.Addr
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

func addrFamily(p netip.Prefix) int {
	if p.Addr().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
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
