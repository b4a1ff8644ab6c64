// Package conntrack reads the kernel's connection tracking table over
// ctnetlink (NETLINK_NETFILTER, IPCTNL_MSG_CT_GET with NLM_F_DUMP), in
// process: no conntrack program is run.
//
// A dump asks the kernel to filter (CTA_FILTER, Linux 5.8; CTA_STATUS_MASK
// on newer kernels) so that only the entries a Filter wants cross into user
// space, and checks every entry it receives against the Filter again:
// kernels that ignore part of the filter give the same answer, only
// slower. A kernel that refuses the filter gets a second, unfiltered dump.
// Entries are decoded one message at a time from one receive buffer and
// handed to a callback; nothing the Filter drops is kept.
//
// The package never logs: what the kernel did with the filter is told in
// Stats, for the caller to report.
package conntrack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Tuple is one direction of a connection, as conntrack keeps it.
type Tuple struct {
	Src, Dst netip.AddrPort
	// Proto is the IP protocol number (unix.IPPROTO_TCP, ...). Ports are 0
	// for protocols without ports.
	Proto uint8
}

// Entry is what a dump tells of one conntrack entry.
type Entry struct {
	// ID is the kernel's identifier of the entry (CTA_ID), stable for the
	// entry's life.
	ID uint32
	// Orig is the tuple of the first packet, before NAT; Reply is the
	// tuple replies are expected with, after NAT.
	Orig, Reply Tuple
	// Status holds the IPS_* bits (linux/netfilter/nf_conntrack_common.h).
	Status uint32
	// TCPState is the TCP tracking state (TCPSynSent, ...); 0 for other
	// protocols.
	TCPState uint8
}

// StatusSeenReply is IPS_SEEN_REPLY: a packet was seen in the reply
// direction.
const StatusSeenReply = 1 << 1

// TCPSynSent is TCP_CONNTRACK_SYN_SENT: a SYN seen, nothing answered.
const TCPSynSent = 1

// tcpStates names the TCP states as conntrack -L prints them
// (enum tcp_conntrack, linux/netfilter/nf_conntrack_tcp.h).
var tcpStates = [...]string{"NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"}

// TCPStateName returns the name conntrack -L prints for a TCP state.
func TCPStateName(s uint8) string {
	if int(s) < len(tcpStates) {
		return tcpStates[s]
	}
	return fmt.Sprintf("STATE%d", s)
}

// SeenReply reports whether a packet was seen in the reply direction.
func (e Entry) SeenReply() bool { return e.Status&StatusSeenReply != 0 }

// Filter selects entries by their reply tuple: for a connection to a local
// server, the reply tuple's source is the server's address and port after
// any DNAT.
type Filter struct {
	// ReplySrc holds the reply sources' addresses, all of one family; an
	// entry matches when its reply tuple's source is one of them.
	ReplySrc []netip.Addr
	// ReplySrcPort is the reply tuple's source port.
	ReplySrcPort uint16
	// Proto is the IP protocol number, unix.IPPROTO_TCP say.
	Proto uint8
	// Unreplied keeps only entries that have not seen a reply.
	Unreplied bool
	// InProcess does not ask the kernel to filter: the whole table of the
	// family is dumped and filtered here.
	InProcess bool
}

// Matches reports whether e is an entry f selects.
func (f Filter) Matches(e Entry) bool {
	if e.Reply.Proto != f.Proto || e.Reply.Src.Port() != f.ReplySrcPort {
		return false
	}
	if f.Unreplied && e.SeenReply() {
		return false
	}
	for _, a := range f.ReplySrc {
		if e.Reply.Src.Addr() == a {
			return true
		}
	}
	return false
}

// family is the address family of f's addresses.
func (f Filter) family() (uint8, error) {
	if len(f.ReplySrc) == 0 {
		return 0, errors.New("conntrack filter without addresses")
	}
	is4 := f.ReplySrc[0].Is4()
	for _, a := range f.ReplySrc {
		if !a.IsValid() || a.Is4In6() || a.Zone() != "" || a.Is4() != is4 {
			return 0, fmt.Errorf("conntrack filter addresses %v are not all of one family", f.ReplySrc)
		}
	}
	if is4 {
		return unix.AF_INET, nil
	}
	return unix.AF_INET6, nil
}

// Stats tells what one dump cost and how the kernel took the filter.
type Stats struct {
	// Received counts the entries the kernel sent; Matched those handed
	// to the callback.
	Received, Matched int
	// KernelFiltered is set when the kernel was asked to filter and did
	// not refuse.
	KernelFiltered bool
	// Excess counts the entries the kernel sent although the filter it
	// accepted excludes them: a kernel older than part of the filter
	// ignores that part.
	Excess int
	// Refused is the kernel's answer when it refused the filter; the
	// entries then came from a second, unfiltered dump.
	Refused error
}

// Table is the conntrack table of one network namespace.
type Table struct{ ns netns.NsHandle }

// NewTable returns the conntrack table of network namespace ns;
// netns.None() is the current one.
func NewTable(ns netns.NsHandle) Table { return Table{ns: ns} }

// receiveTimeout bounds the wait for each datagram of a dump when ctx has
// no earlier deadline.
const receiveTimeout = 5 * time.Second

// bufferSize holds the largest datagram a dump sends: the kernel sizes
// dump messages up to 32 KiB.
const bufferSize = 64 << 10

// Dump hands each entry of the table that f matches to fn, in the
// kernel's order, and returns how the dump went. An error from fn ends the
// dump and is returned.
func (t Table) Dump(ctx context.Context, f Filter, fn func(Entry) error) (Stats, error) {
	family, err := f.family()
	if err != nil {
		return Stats{}, err
	}
	if f.InProcess {
		return t.dump(ctx, family, nil, f.Matches, fn)
	}
	return t.dumpFiltered(ctx, family, kernelFilterFor(f, family), f.Matches, fn)
}

// dumpFiltered dumps with the kernel filtering by k and, if the kernel
// refuses k, again without.
func (t Table) dumpFiltered(ctx context.Context, family uint8, k kernelFilter, match func(Entry) bool, fn func(Entry) error) (Stats, error) {
	st, err := t.dump(ctx, family, &k, match, fn)
	// The kernel refuses a filter when the dump starts, before any entry;
	// an error after entries were handed on is not a refusal, and a
	// second dump would hand them on twice.
	if err == nil || !isRefusal(err) || st.Received > 0 {
		return st, err
	}
	refused := err
	st, err = t.dump(ctx, family, nil, match, fn)
	st.Refused = refused
	return st, err
}

// isRefusal reports whether err is the kernel refusing a dump's filter, as
// it does for attributes or flags it does not know.
func isRefusal(err error) bool {
	var ke kernelError
	return errors.As(err, &ke) && (ke.errno == unix.EINVAL || ke.errno == unix.EOPNOTSUPP)
}

// kernelError is an error the kernel answered a request with.
type kernelError struct{ errno unix.Errno }

func (e kernelError) Error() string { return fmt.Sprintf("the kernel answered: %v", e.errno) }
func (e kernelError) Unwrap() error { return e.errno }

// kernelFilter is what a dump asks the kernel to filter by. Its fields
// mirror the request's attributes.
type kernelFilter struct {
	// replyFlags are the CTA_FILTER_F_* bits of CTA_FILTER_REPLY_FLAGS.
	replyFlags uint32
	replySrc   netip.Addr // with filterIPSrc
	proto      uint8      // with filterProtoNum
	srcPort    uint16     // with filterProtoSrc
	// statusMask and status: only entries whose status masked with
	// statusMask equals status; none when statusMask is 0.
	statusMask, status uint32
}

// kernelFilterFor is the part of f the kernel can filter by: the reply
// tuple's protocol and source port, its source address when there is one
// and it is IPv4, and the status.
//
// An IPv6 address is never asked for: ctnetlink_filter_match_tuple()
// (net/netfilter/nf_conntrack_netlink.c, from Linux 5.8 to at least 6.18)
// tests IPv6 addresses with !ipv6_addr_cmp(), which is true when they are
// equal, and so drops exactly the entries whose address matches.
func kernelFilterFor(f Filter, family uint8) kernelFilter {
	k := kernelFilter{replyFlags: filterProtoNum | filterProtoSrc, proto: f.Proto, srcPort: f.ReplySrcPort}
	if len(f.ReplySrc) == 1 && family == unix.AF_INET {
		k.replyFlags |= filterIPSrc
		k.replySrc = f.ReplySrc[0]
	}
	if f.Unreplied {
		k.statusMask = StatusSeenReply
	}
	return k
}

// matches reports whether the kernel, filtering by k, would send e.
func (k kernelFilter) matches(e Entry) bool {
	if k.replyFlags&filterProtoNum != 0 && e.Reply.Proto != k.proto {
		return false
	}
	if k.replyFlags&filterProtoSrc != 0 && e.Reply.Src.Port() != k.srcPort {
		return false
	}
	if k.replyFlags&filterIPSrc != 0 && e.Reply.Src.Addr() != k.replySrc {
		return false
	}
	return e.Status&k.statusMask == k.status
}

// attrs are the request attributes that ask the kernel to filter by k.
func (k kernelFilter) attrs() []nl.NetlinkRequestData {
	ip := nl.NewRtAttr(unix.NLA_F_NESTED|ctaTupleIP, nil)
	if k.replyFlags&filterIPSrc != 0 {
		typ := ctaIPv4Src
		if k.replySrc.Is6() {
			typ = ctaIPv6Src
		}
		ip.AddRtAttr(typ, k.replySrc.AsSlice())
	}
	proto := nl.NewRtAttr(unix.NLA_F_NESTED|ctaTupleProto, nil)
	proto.AddRtAttr(ctaProtoNum, []byte{k.proto})
	proto.AddRtAttr(ctaProtoSrc, binary.BigEndian.AppendUint16(nil, k.srcPort))
	reply := nl.NewRtAttr(unix.NLA_F_NESTED|ctaTupleReply, nil)
	reply.AddChild(ip)
	reply.AddChild(proto)
	filter := nl.NewRtAttr(unix.NLA_F_NESTED|ctaFilter, nil)
	filter.AddRtAttr(ctaFilterReply, binary.NativeEndian.AppendUint32(nil, k.replyFlags))
	out := []nl.NetlinkRequestData{reply, filter}
	if k.statusMask != 0 {
		out = append(out,
			nl.NewRtAttr(ctaStatus, binary.BigEndian.AppendUint32(nil, k.status)),
			nl.NewRtAttr(ctaStatusMask, binary.BigEndian.AppendUint32(nil, k.statusMask)))
	}
	return out
}

// nfgenmsg is the nfnetlink header: family, version, resource id.
type nfgenmsg struct{ family uint8 }

func (nfgenmsg) Len() int { return nfgenmsgLen }
func (h nfgenmsg) Serialize() []byte {
	return []byte{h.family, 0 /* NFNETLINK_V0 */, 0, 0}
}

// dump runs one dump of family's entries, filtered by the kernel with k
// when k is not nil, and hands those match accepts to fn.
func (t Table) dump(ctx context.Context, family uint8, k *kernelFilter, match func(Entry) bool, fn func(Entry) error) (Stats, error) {
	st := Stats{KernelFiltered: k != nil}
	s, err := nl.GetNetlinkSocketAt(t.ns, netns.None(), unix.NETLINK_NETFILTER)
	if err != nil {
		return st, fmt.Errorf("opening ctnetlink socket: %w", err)
	}
	defer s.Close()
	req := nl.NewNetlinkRequest(nfnlSubsysCTNetlink<<8|ctMsgGet, unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	req.AddData(nfgenmsg{family: family})
	if k != nil {
		for _, a := range k.attrs() {
			req.AddData(a)
		}
	}
	if err := s.Send(req); err != nil {
		return st, fmt.Errorf("sending conntrack dump request: %w", err)
	}
	buf := make([]byte, bufferSize)
	for {
		n, err := receive(ctx, s.GetFd(), buf)
		if err != nil {
			return st, fmt.Errorf("receiving conntrack dump: %w", err)
		}
		done, err := st.handle(buf[:n], req.Seq, k, match, fn)
		if err != nil || done {
			return st, err
		}
	}
}

// handle decodes one datagram of the dump with sequence number seq. done
// is set at the end of the dump.
func (st *Stats) handle(b []byte, seq uint32, k *kernelFilter, match func(Entry) bool, fn func(Entry) error) (done bool, err error) {
	ms := messages{b: b}
	for ms.next() {
		m := ms.m
		if m.seq != seq {
			continue
		}
		switch m.typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			if len(m.data) < 4 {
				return true, fmt.Errorf("netlink message of type %d with %d bytes", m.typ, len(m.data))
			}
			if errno := int32(binary.NativeEndian.Uint32(m.data[:4])); errno != 0 {
				return true, kernelError{errno: unix.Errno(-errno)}
			}
			return true, nil
		case nfnlSubsysCTNetlink<<8 | ctMsgNew:
		default:
			continue
		}
		e, err := decodeEntry(m.data)
		if err != nil {
			return true, err
		}
		st.Received++
		if k != nil && !k.matches(e) {
			st.Excess++
		}
		if !match(e) {
			continue
		}
		st.Matched++
		if err := fn(e); err != nil {
			return true, err
		}
	}
	if ms.err != nil {
		return true, ms.err
	}
	return false, nil
}

// receive reads one datagram from the non-blocking socket fd into buf,
// waiting until ctx's deadline or receiveTimeout, whichever comes first.
func receive(ctx context.Context, fd int, buf []byte) (int, error) {
	deadline := time.Now().Add(receiveTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	for {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		n, _, flags, _, err := unix.Recvmsg(fd, buf, nil, unix.MSG_DONTWAIT)
		switch {
		case err == nil && flags&unix.MSG_TRUNC != 0:
			return 0, fmt.Errorf("datagram larger than %d bytes", len(buf))
		case err == nil:
			return n, nil
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return 0, err
		}
		wait := time.Until(deadline)
		if wait <= 0 {
			return 0, errors.New("timed out")
		}
		// Wake at least every 100ms to notice a cancelled context.
		ms := int(min(wait, 100*time.Millisecond) / time.Millisecond)
		if _, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, max(ms, 1)); err != nil && err != unix.EINTR {
			return 0, err
		}
	}
}
