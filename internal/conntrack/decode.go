package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// ctnetlink message types and attributes
// (linux/netfilter/nfnetlink_conntrack.h). Values are big-endian unless
// said otherwise; attribute headers are in host order.
const (
	nfnlSubsysCTNetlink = 1 // NFNL_SUBSYS_CTNETLINK
	ctMsgNew            = 0 // IPCTNL_MSG_CT_NEW: what a dump answers with
	ctMsgGet            = 1 // IPCTNL_MSG_CT_GET

	ctaTupleOrig   = 1  // CTA_TUPLE_ORIG, nested
	ctaTupleReply  = 2  // CTA_TUPLE_REPLY, nested
	ctaStatus      = 3  // CTA_STATUS, u32
	ctaProtoinfo   = 4  // CTA_PROTOINFO, nested
	ctaID          = 12 // CTA_ID, u32
	ctaFilter      = 25 // CTA_FILTER, nested (Linux 5.8)
	ctaStatusMask  = 26 // CTA_STATUS_MASK, u32 (newer kernels; older ones ignore it)
	ctaTupleIP     = 1  // CTA_TUPLE_IP, nested
	ctaTupleProto  = 2  // CTA_TUPLE_PROTO, nested
	ctaIPv4Src     = 1  // CTA_IP_V4_SRC, 4 bytes
	ctaIPv4Dst     = 2  // CTA_IP_V4_DST
	ctaIPv6Src     = 3  // CTA_IP_V6_SRC, 16 bytes
	ctaIPv6Dst     = 4  // CTA_IP_V6_DST
	ctaProtoNum    = 1  // CTA_PROTO_NUM, u8
	ctaProtoSrc    = 2  // CTA_PROTO_SRC_PORT, u16
	ctaProtoDst    = 3  // CTA_PROTO_DST_PORT, u16
	ctaInfoTCP     = 1  // CTA_PROTOINFO_TCP, nested
	ctaTCPState    = 1  // CTA_PROTOINFO_TCP_STATE, u8
	ctaFilterOrig  = 1  // CTA_FILTER_ORIG_FLAGS, u32 in host order
	ctaFilterReply = 2  // CTA_FILTER_REPLY_FLAGS, u32 in host order

	// Which fields of a tuple a CTA_FILTER matches
	// (net/netfilter/nf_internals.h, CTA_FILTER_F_*).
	filterIPSrc     = 1 << 0
	filterProtoNum  = 1 << 3
	filterProtoSrc  = 1 << 4
	nlaTypeMask     = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
	nfgenmsgLen     = 4
	attrHeaderLen   = 4
	maxAttrNestings = 4
)

// attrs walks the netlink attributes packed in b: each is a 4-byte header
// (length including the header, type), its value and padding to 4 bytes.
type attrs struct {
	b   []byte
	typ uint16
	val []byte
	err error
}

// next moves to the next attribute; false at the end or on a malformed
// one, which sets err.
func (a *attrs) next() bool {
	if len(a.b) == 0 || a.err != nil {
		return false
	}
	if len(a.b) < attrHeaderLen {
		a.err = fmt.Errorf("%d stray bytes after the last attribute", len(a.b))
		return false
	}
	n := int(binary.NativeEndian.Uint16(a.b[0:2]))
	if n < attrHeaderLen || n > len(a.b) {
		a.err = fmt.Errorf("attribute of length %d in %d bytes", n, len(a.b))
		return false
	}
	a.typ = binary.NativeEndian.Uint16(a.b[2:4]) & nlaTypeMask
	a.val = a.b[attrHeaderLen:n]
	if aligned := (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1); aligned < len(a.b) {
		a.b = a.b[aligned:]
	} else {
		a.b = nil
	}
	return true
}

// decodeEntry decodes the payload of one IPCTNL_MSG_CT_NEW message: the
// nfgenmsg header, then the attributes. Only what Entry holds is read;
// every other attribute is skipped.
func decodeEntry(b []byte) (Entry, error) {
	var e Entry
	if len(b) < nfgenmsgLen {
		return e, fmt.Errorf("conntrack message of %d bytes, shorter than its header", len(b))
	}
	family := b[0]
	if family != unix.AF_INET && family != unix.AF_INET6 {
		return e, fmt.Errorf("conntrack entry of address family %d", family)
	}
	var haveOrig, haveReply bool
	a := attrs{b: b[nfgenmsgLen:]}
	for a.next() {
		var err error
		switch a.typ {
		case ctaTupleOrig:
			e.Orig, err = decodeTuple(a.val, family)
			haveOrig = true
		case ctaTupleReply:
			e.Reply, err = decodeTuple(a.val, family)
			haveReply = true
		case ctaStatus:
			e.Status, err = be32(a.val)
		case ctaID:
			e.ID, err = be32(a.val)
		case ctaProtoinfo:
			e.TCPState, err = decodeTCPState(a.val)
		}
		if err != nil {
			return e, fmt.Errorf("conntrack attribute %d: %w", a.typ, err)
		}
	}
	if a.err != nil {
		return e, fmt.Errorf("conntrack entry: %w", a.err)
	}
	if !haveOrig || !haveReply {
		return e, errors.New("conntrack entry without both tuples")
	}
	return e, nil
}

// decodeTuple decodes a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY payload of an
// entry of family.
func decodeTuple(b []byte, family uint8) (Tuple, error) {
	var (
		t                Tuple
		src, dst         netip.Addr
		srcPort, dstPort uint16
		haveIP, haveNum  bool
	)
	a := attrs{b: b}
	for a.next() {
		switch a.typ {
		case ctaTupleIP:
			var err error
			if src, dst, err = decodeIPs(a.val, family); err != nil {
				return t, err
			}
			haveIP = true
		case ctaTupleProto:
			p := attrs{b: a.val}
			for p.next() {
				var err error
				switch p.typ {
				case ctaProtoNum:
					if len(p.val) != 1 {
						return t, fmt.Errorf("protocol number of %d bytes", len(p.val))
					}
					t.Proto, haveNum = p.val[0], true
				case ctaProtoSrc:
					srcPort, err = be16(p.val)
				case ctaProtoDst:
					dstPort, err = be16(p.val)
				}
				if err != nil {
					return t, fmt.Errorf("port: %w", err)
				}
			}
			if p.err != nil {
				return t, fmt.Errorf("tuple protocol: %w", p.err)
			}
		}
	}
	if a.err != nil {
		return t, fmt.Errorf("tuple: %w", a.err)
	}
	if !haveIP || !haveNum {
		return t, errors.New("tuple without addresses or protocol")
	}
	t.Src, t.Dst = netip.AddrPortFrom(src, srcPort), netip.AddrPortFrom(dst, dstPort)
	return t, nil
}

// decodeIPs decodes a CTA_TUPLE_IP payload: both addresses of family.
func decodeIPs(b []byte, family uint8) (src, dst netip.Addr, err error) {
	srcType, dstType, size := uint16(ctaIPv4Src), uint16(ctaIPv4Dst), 4
	if family == unix.AF_INET6 {
		srcType, dstType, size = ctaIPv6Src, ctaIPv6Dst, 16
	}
	a := attrs{b: b}
	for a.next() {
		if a.typ != srcType && a.typ != dstType {
			continue
		}
		if len(a.val) != size {
			return src, dst, fmt.Errorf("address of %d bytes in a family %d tuple", len(a.val), family)
		}
		addr, _ := netip.AddrFromSlice(a.val)
		if a.typ == srcType {
			src = addr
		} else {
			dst = addr
		}
	}
	if a.err != nil {
		return src, dst, fmt.Errorf("tuple addresses: %w", a.err)
	}
	if !src.IsValid() || !dst.IsValid() {
		return src, dst, errors.New("tuple without both addresses")
	}
	return src, dst, nil
}

// decodeTCPState reads CTA_PROTOINFO_TCP_STATE from a CTA_PROTOINFO
// payload; 0 when there is none (another protocol).
func decodeTCPState(b []byte) (uint8, error) {
	a := attrs{b: b}
	for a.next() {
		if a.typ != ctaInfoTCP {
			continue
		}
		t := attrs{b: a.val}
		for t.next() {
			if t.typ == ctaTCPState {
				if len(t.val) != 1 {
					return 0, fmt.Errorf("TCP state of %d bytes", len(t.val))
				}
				return t.val[0], nil
			}
		}
		if t.err != nil {
			return 0, fmt.Errorf("TCP protocol info: %w", t.err)
		}
	}
	if a.err != nil {
		return 0, fmt.Errorf("protocol info: %w", a.err)
	}
	return 0, nil
}

func be32(b []byte) (uint32, error) {
	if len(b) != 4 {
		return 0, fmt.Errorf("%d bytes where 4 belong", len(b))
	}
	return binary.BigEndian.Uint32(b), nil
}

func be16(b []byte) (uint16, error) {
	if len(b) != 2 {
		return 0, fmt.Errorf("%d bytes where 2 belong", len(b))
	}
	return binary.BigEndian.Uint16(b), nil
}

// message is one netlink message of a datagram.
type message struct {
	typ, flags uint16
	seq        uint32
	data       []byte
}

// messages walks the netlink messages packed in one datagram.
type messages struct {
	b   []byte
	m   message
	err error
}

func (ms *messages) next() bool {
	if len(ms.b) == 0 || ms.err != nil {
		return false
	}
	if len(ms.b) < unix.NLMSG_HDRLEN {
		ms.err = fmt.Errorf("%d stray bytes after the last netlink message", len(ms.b))
		return false
	}
	n := int(binary.NativeEndian.Uint32(ms.b[0:4]))
	if n < unix.NLMSG_HDRLEN || n > len(ms.b) {
		ms.err = fmt.Errorf("netlink message of length %d in %d bytes", n, len(ms.b))
		return false
	}
	ms.m = message{
		typ:   binary.NativeEndian.Uint16(ms.b[4:6]),
		flags: binary.NativeEndian.Uint16(ms.b[6:8]),
		seq:   binary.NativeEndian.Uint32(ms.b[8:12]),
		data:  ms.b[unix.NLMSG_HDRLEN:n],
	}
	if aligned := (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1); aligned < len(ms.b) {
		ms.b = ms.b[aligned:]
	} else {
		ms.b = nil
	}
	return true
}
