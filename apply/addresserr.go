package apply

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// IPVSLink is the link kube-proxy in IPVS mode puts every Service ClusterIP
// on. The sidecar never changes it.
const IPVSLink = "kube-ipvs0"

// Cause names why an address could not be kept, for the log, /readyz and
// the README's troubleshooting table.
type Cause string

// The causes AddressError names.
const (
	// CausePermission: the kernel refused the change; the container lacks
	// CAP_NET_ADMIN (or runs as a user without it).
	CausePermission Cause = "permission denied: the sidecar needs CAP_NET_ADMIN"
	// CauseIPv6DisabledOnLink: IPv6 is disabled on the interface alone
	// (net.ipv6.conf.IFACE.disable_ipv6=1) while the node has it.
	CauseIPv6DisabledOnLink Cause = "IPv6 is disabled on the interface"
	// CauseNoDummy: the kernel cannot create dummy links (CONFIG_DUMMY).
	CauseNoDummy Cause = "the kernel has no dummy link driver (CONFIG_DUMMY); create the link beforehand, or use another --interface"
	// CauseLinkMissing: the interface went away while the sync used it.
	CauseLinkMissing Cause = "the interface does not exist"
	// CauseIPVS: kube-proxy in IPVS mode holds the address on kube-ipvs0.
	CauseIPVS Cause = "kube-proxy's IPVS holds the address"
)

// AddressError is an address or link change that failed, with its cause
// where the sidecar can tell it.
type AddressError struct {
	// Addr is the address concerned; invalid for a link error.
	Addr netip.Addr
	// Link is the interface concerned.
	Link  string
	Cause Cause
	Err   error
}

func (e *AddressError) Error() string {
	if e.Cause == "" || e.Cause == CauseIPVS {
		return e.Err.Error()
	}
	return fmt.Sprintf("%v (%s)", e.Err, e.Cause)
}

func (e *AddressError) Unwrap() error { return e.Err }

// FamilyUnavailableError says that an address's family cannot be served on
// this node at all: IPv6 disabled node-wide, or absent from the kernel.
// Ensure skips such addresses with a warning as long as one of another
// family is served. A dual-stack node agent that fails for the missing
// family would take the other one down with it: the init container would
// crash-loop, and the node get no proxy at all, while no client of the
// missing family can exist on it.
type FamilyUnavailableError struct {
	Family string // "IPv6"
	Reason string
}

func (e *FamilyUnavailableError) Error() string { return e.Reason }

// familyUnavailable returns a *FamilyUnavailableError when p's family
// cannot be served on this node, an *AddressError when IPv6 is disabled on
// the interface alone, and nil otherwise. Only IPv6 can be switched off.
func (a *Address) familyUnavailable(p netip.Prefix) error {
	if p.Addr().Is4() {
		return nil
	}
	all, err := a.proc("/proc/sys/net/ipv6/conf/all/disable_ipv6")
	if errors.Is(err, os.ErrNotExist) {
		return &FamilyUnavailableError{Family: "IPv6", Reason: "IPv6 is not available in this kernel (booted with ipv6.disable=1, or built without IPv6)"}
	}
	onLink, linkErr := a.proc("/proc/sys/net/ipv6/conf/" + a.iface + "/disable_ipv6")
	nodeWide := err == nil && bytes.Equal(bytes.TrimSpace(all), []byte("1"))
	switch {
	case linkErr == nil && bytes.Equal(bytes.TrimSpace(onLink), []byte("1")) && !nodeWide:
		return &AddressError{Addr: p.Addr(), Link: a.iface, Cause: CauseIPv6DisabledOnLink,
			Err: fmt.Errorf("cannot add %s to %s: IPv6 is disabled on %s (net.ipv6.conf.%s.disable_ipv6=1)", p, a.iface, a.iface, a.iface)}
	case nodeWide && (linkErr != nil || bytes.Equal(bytes.TrimSpace(onLink), []byte("1"))):
		return &FamilyUnavailableError{Family: "IPv6", Reason: "IPv6 is disabled on this node (net.ipv6.conf.all.disable_ipv6=1)"}
	}
	return nil
}

// explain wraps err, from a change to p (or to the link, for the zero
// Prefix), with its cause where the error tells it.
func (a *Address) explain(err error, p netip.Prefix) error {
	e := &AddressError{Link: a.iface, Err: err}
	if p.IsValid() {
		e.Addr = p.Addr()
	}
	switch {
	case errors.Is(err, unix.EPERM):
		e.Cause = CausePermission
	case errors.Is(err, unix.EACCES):
		// The kernel says EACCES for an IPv6 address on a link where IPv6
		// is disabled, and for a missing capability.
		if p.IsValid() {
			if u := a.familyUnavailable(p); u != nil {
				var ae *AddressError
				if errors.As(u, &ae) {
					e.Cause = ae.Cause
					break
				}
				return u
			}
		}
		e.Cause = CausePermission
	case errors.Is(err, unix.EOPNOTSUPP) && !p.IsValid() && strings.HasPrefix(err.Error(), "creating dummy link"):
		e.Cause = CauseNoDummy
	case errors.Is(err, unix.ENODEV) || isLinkNotFound(err):
		e.Cause = CauseLinkMissing
	}
	return e
}

// familyName is "IPv4" or "IPv6".
func familyName(p netip.Prefix) string {
	if p.Addr().Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// kernelAtLeast reports whether the running kernel is major.minor or
// newer; it says yes when the release cannot be read.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return true
	}
	release := unix.ByteSliceToString(u.Release[:])
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return true
	}
	digits := func(s string) string { return s[:len(s)-len(strings.TrimLeft(s, "0123456789"))] }
	maj, err1 := strconv.Atoi(digits(parts[0]))
	min, err2 := strconv.Atoi(digits(parts[1]))
	if err1 != nil || err2 != nil {
		return true
	}
	return maj > major || (maj == major && min >= minor)
}
