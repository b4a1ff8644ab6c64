package apply

import (
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// AddressProtocol is the address protocol (IFA_PROTO, Linux 5.18+) every
// address the sidecar adds carries: the kernel keeps it with the address,
// so a later run, or a teardown with another --ip-address, can tell our
// addresses from everyone else's. iproute2 6.3 and later show it with
// `ip -d address show` as "proto 97". The kernel reserves 0 to 3 for its
// own addresses; the value means nothing to anyone else.
const AddressProtocol uint8 = 97

// LinkAlias is the alias (IFLA_IFALIAS, `ip link show` prints it as
// "alias ...") of a dummy link the sidecar created, so that a later run
// knows the link is its own and a teardown may delete it.
const LinkAlias = "apiserver-proxy-sidecar"

// ifaProto is IFA_PROTO, which golang.org/x/sys/unix does not name.
const ifaProto = 11

// ifAddr is an address on a link as the kernel lists it, with the address
// protocol that vishvananda/netlink does not read.
type ifAddr struct {
	netlink.Addr
	// Proto is the address's IFA_PROTO: AddressProtocol for ours; 0 when
	// unset or on kernels before 5.18.
	Proto uint8
}

// rtnl is the netlink handle the Address uses: vishvananda/netlink for
// links and deletions, and requests of its own for what that library
// cannot express, listing and adding addresses with their protocol.
type rtnl struct {
	*netlink.Handle
	// sockets holds the route socket of another network namespace; nil
	// for the current one.
	sockets map[int]*nl.SocketHandle
}

// newRTNL opens the handles for the network namespace ns, or the current
// one for netns.None().
func newRTNL(ns netns.NsHandle) (*rtnl, error) {
	if !ns.IsOpen() {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return nil, err
		}
		return &rtnl{Handle: h}, nil
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	cur, err := netns.Get()
	if err != nil {
		h.Close()
		return nil, err
	}
	defer cur.Close()
	s, err := nl.GetNetlinkSocketAt(ns, cur, unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, err
	}
	return &rtnl{Handle: h, sockets: map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}}, nil
}

// Close closes both handles.
func (r *rtnl) Close() {
	r.Handle.Close()
	for _, s := range r.sockets {
		s.Socket.Close()
	}
}

func (r *rtnl) request(proto, flags int) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(proto, flags)
	req.Sockets = r.sockets
	return req
}

// AddrList lists the addresses of family on link, or on every link when
// link is nil, with their protocol. A dump the kernel interrupted because
// the addresses changed meanwhile is netlink.ErrDumpInterrupted.
func (r *rtnl) AddrList(link netlink.Link, family int) ([]ifAddr, error) {
	req := r.request(unix.RTM_GETADDR, unix.NLM_F_DUMP)
	req.AddData(nl.NewIfAddrmsg(family))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWADDR)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, err
	}
	index := 0
	if link != nil {
		index = link.Attrs().Index
	}
	out := make([]ifAddr, 0, len(msgs))
	for _, m := range msgs {
		a, err := parseIfAddr(m)
		if err != nil {
			return nil, err
		}
		if index == 0 || a.LinkIndex == index {
			out = append(out, a)
		}
	}
	if err != nil {
		return nil, err // interrupted: the caller lists again
	}
	return out, nil
}

// parseIfAddr decodes one RTM_NEWADDR message.
func parseIfAddr(m []byte) (ifAddr, error) {
	if len(m) < unix.SizeofIfAddrmsg {
		return ifAddr{}, fmt.Errorf("address message of %d bytes", len(m))
	}
	msg := nl.DeserializeIfAddrmsg(m)
	attrs, err := nl.ParseRouteAttr(m[msg.Len():])
	if err != nil {
		return ifAddr{}, fmt.Errorf("address message: %w", err)
	}
	a := ifAddr{Addr: netlink.Addr{LinkIndex: int(msg.Index), Scope: int(msg.Scope), Flags: int(msg.Flags)}}
	var local, address []byte
	for _, at := range attrs {
		switch at.Attr.Type {
		case unix.IFA_LOCAL:
			local = at.Value
		case unix.IFA_ADDRESS:
			address = at.Value
		case unix.IFA_FLAGS:
			if len(at.Value) >= 4 {
				a.Flags = int(native.Uint32(at.Value))
			}
		case ifaProto:
			if len(at.Value) >= 1 {
				a.Proto = at.Value[0]
			}
		}
	}
	// IPv4 keeps the address in IFA_LOCAL (IFA_ADDRESS is the peer on
	// point-to-point links); IPv6 in IFA_ADDRESS.
	ip := local
	if ip == nil {
		ip = address
	}
	bits := 8 * len(ip)
	if (bits != 32 && bits != 128) || int(msg.Prefixlen) > bits {
		return ifAddr{}, fmt.Errorf("address message with a %d-byte address and prefix length %d", len(ip), msg.Prefixlen)
	}
	a.IPNet = &net.IPNet{IP: net.IP(ip), Mask: net.CIDRMask(int(msg.Prefixlen), bits)}
	return a, nil
}

// AddrAdd adds addr to link with the address protocol proto, or, where
// the same address and prefix exist on link, replaces it (setting the
// protocol on an address an earlier version added without one).
func (r *rtnl) AddrAdd(link netlink.Link, addr *netlink.Addr, proto uint8) error {
	req := r.request(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE|unix.NLM_F_ACK)
	ip := addr.IP.To4()
	family := unix.AF_INET
	if ip == nil {
		ip, family = addr.IP.To16(), unix.AF_INET6
	}
	ones, _ := addr.Mask.Size()
	msg := nl.NewIfAddrmsg(family)
	msg.Index = uint32(link.Attrs().Index)
	msg.Prefixlen = uint8(ones)
	msg.Scope = uint8(addr.Scope)
	msg.Flags = uint8(addr.Flags & 0xff)
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.IFA_LOCAL, ip))
	req.AddData(nl.NewRtAttr(unix.IFA_ADDRESS, ip))
	flags := make([]byte, 4)
	native.PutUint32(flags, uint32(addr.Flags))
	req.AddData(nl.NewRtAttr(unix.IFA_FLAGS, flags))
	req.AddData(nl.NewRtAttr(ifaProto, []byte{proto}))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

var native = nl.NativeEndian()
