package conntrack

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

// equateAddrPorts compares addresses and ports with ==.
var equateAddrPorts = cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })

// recorded returns the datagrams of testdata/dump.txt by name.
func recorded(t testing.TB) map[string][]byte {
	t.Helper()
	f, err := os.Open("testdata/dump.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]byte{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, h, ok := strings.Cut(line, " ")
		b, err := hex.DecodeString(h)
		if !ok || err != nil {
			t.Fatalf("testdata/dump.txt: bad line %q: %v", line, err)
		}
		out[name] = b
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// attr builds one netlink attribute of typ holding the concatenated
// payloads, padded.
func attr(typ uint16, payload ...[]byte) []byte {
	var v []byte
	for _, p := range payload {
		v = append(v, p...)
	}
	b := binary.NativeEndian.AppendUint16(nil, uint16(attrHeaderLen+len(v)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, v...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// nest builds a nested attribute, flagged as the kernel flags them.
func nest(typ uint16, children ...[]byte) []byte { return attr(typ|unix.NLA_F_NESTED, children...) }

func be16b(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32b(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// tupleAttr builds a tuple of t's family.
func tupleAttr(typ uint16, t Tuple) []byte {
	srcType, dstType := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if t.Src.Addr().Is6() {
		srcType, dstType = ctaIPv6Src, ctaIPv6Dst
	}
	return nest(typ,
		nest(ctaTupleIP, attr(srcType, t.Src.Addr().AsSlice()), attr(dstType, t.Dst.Addr().AsSlice())),
		nest(ctaTupleProto, attr(ctaProtoNum, []byte{t.Proto}), attr(ctaProtoSrc, be16b(t.Src.Port())), attr(ctaProtoDst, be16b(t.Dst.Port()))))
}

// entryPayload builds the payload of an IPCTNL_MSG_CT_NEW message for e,
// with the attributes the kernel sends that Entry does not hold.
func entryPayload(e Entry) []byte {
	family := byte(unix.AF_INET)
	if e.Orig.Src.Addr().Is6() {
		family = unix.AF_INET6
	}
	b := []byte{family, 0, 0, 0}
	b = append(b, tupleAttr(ctaTupleOrig, e.Orig)...)
	b = append(b, tupleAttr(ctaTupleReply, e.Reply)...)
	b = append(b, attr(ctaStatus, be32b(e.Status))...)
	b = append(b, attr(8 /* CTA_MARK */, be32b(0))...)
	b = append(b, attr(ctaID, be32b(e.ID))...)
	b = append(b, attr(11 /* CTA_USE */, be32b(1))...)
	b = append(b, attr(7 /* CTA_TIMEOUT */, be32b(119))...)
	b = append(b, nest(ctaProtoinfo, nest(ctaInfoTCP,
		attr(ctaTCPState, []byte{e.TCPState}),
		attr(2 /* WSCALE_ORIGINAL */, []byte{7}),
		attr(4 /* FLAGS_ORIGINAL */, []byte{0x0a, 0x0a})))...)
	b = append(b, nest(9 /* CTA_COUNTERS_ORIG */, attr(1, make([]byte, 8)), attr(2, make([]byte, 8)))...)
	return b
}

// nlMessage builds one netlink message.
func nlMessage(typ, flags uint16, seq uint32, payload []byte) []byte {
	b := binary.NativeEndian.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(payload)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 4242)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// negErrno is errno as the kernel reports it: negated, in host order.
func negErrno(errno unix.Errno) []byte {
	n := -int32(errno)
	return binary.NativeEndian.AppendUint32(nil, uint32(n))
}

func errorMessage(seq uint32, errno unix.Errno) []byte {
	p := negErrno(errno)
	p = append(p, make([]byte, unix.NLMSG_HDRLEN)...) // the request's header
	return nlMessage(unix.NLMSG_ERROR, 0, seq, p)
}

const newMsg = nfnlSubsysCTNetlink<<8 | ctMsgNew

func tcp(src, dst string) Tuple {
	return Tuple{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst), Proto: unix.IPPROTO_TCP}
}

// broken is the entry of a connection DNATed to 10.96.0.2:443 and never
// answered.
var broken = Entry{
	ID:       77,
	Orig:     tcp("192.0.2.2:40001", "100.64.0.1:443"),
	Reply:    tcp("10.96.0.2:443", "192.0.2.2:40001"),
	Status:   0x188, // CONFIRMED, DST_NAT_DONE, SRC_NAT_DONE
	TCPState: TCPSynSent,
}

// TestDecodeRecorded decodes datagrams recorded from the kernel.
func TestDecodeRecorded(t *testing.T) {
	rec := recorded(t)
	for _, tc := range []struct {
		name        string
		orig, reply Tuple
		state       string
		seenReply   bool
	}{
		{name: "ipv4-dnat-unreplied", orig: tcp("192.0.2.2:40001", "100.64.0.1:443"), reply: tcp("10.96.0.2:443", "192.0.2.2:40001"), state: "SYN_SENT"},
		{name: "ipv6-dnat-unreplied", orig: tcp("[2001:db8::2]:40001", "[fd00::100:1]:443"), reply: tcp("[fd00::2]:443", "[2001:db8::2]:40001"), state: "SYN_SENT"},
		{name: "ipv4-dnat-answered", orig: tcp("192.0.2.2:42504", "100.64.0.1:443"), reply: tcp("10.96.0.2:443", "192.0.2.2:42504"), state: "FIN_WAIT", seenReply: true},
		{name: "ipv6-dnat-answered", orig: tcp("[2001:db8::2]:55430", "[fd00::100:1]:443"), reply: tcp("[fd00::2]:443", "[2001:db8::2]:55430"), state: "TIME_WAIT", seenReply: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dg := rec[tc.name]
			var got []Entry
			var st Stats
			seq := binary.NativeEndian.Uint32(dg[8:12])
			done, err := st.handle(dg, seq, nil, func(Entry) bool { return true }, func(e Entry) error {
				got = append(got, e)
				return nil
			})
			if err != nil || done {
				t.Fatalf("handle = done %v, %v; want more to come", done, err)
			}
			if len(got) != 1 {
				t.Fatalf("decoded %d entries, want 1", len(got))
			}
			e := got[0]
			if diff := cmp.Diff([]Tuple{tc.orig, tc.reply}, []Tuple{e.Orig, e.Reply}, equateAddrPorts); diff != "" {
				t.Errorf("tuples (-want +got):\n%s", diff)
			}
			if e.ID == 0 || TCPStateName(e.TCPState) != tc.state || e.SeenReply() != tc.seenReply {
				t.Errorf("ID %d, state %s, seen reply %v; want an ID, %s, %v", e.ID, TCPStateName(e.TCPState), e.SeenReply(), tc.state, tc.seenReply)
			}
			if dnat := uint32(1<<5 | 1<<8); e.Status&dnat != dnat { // IPS_DST_NAT, IPS_DST_NAT_DONE
				t.Errorf("status %#x does not say DNAT", e.Status)
			}
		})
	}

	var st Stats
	done, err := st.handle(rec["done"], 1, nil, nil, nil)
	if !done || err != nil {
		t.Errorf("the end of a dump: done %v, %v; want done, nil", done, err)
	}
}

// TestDecodeTruncated cuts recorded and constructed messages at every
// byte: the decoder returns an error, never panics, and accepts a cut
// only between attributes after both tuples.
func TestDecodeTruncated(t *testing.T) {
	rec := recorded(t)
	payloads := map[string][]byte{"constructed": entryPayload(broken)}
	for name, dg := range rec {
		if name != "done" {
			payloads[name] = dg[unix.NLMSG_HDRLEN:]
		}
	}
	for name, p := range payloads {
		// Where decoding may stop: at the end of each top-level attribute
		// from the reply tuple on.
		ok := map[int]bool{}
		a := attrs{b: p[nfgenmsgLen:]}
		off, tuples := nfgenmsgLen, 0
		for a.next() {
			off = len(p) - len(a.b)
			if a.typ == ctaTupleOrig || a.typ == ctaTupleReply {
				tuples++
			}
			if tuples == 2 {
				ok[off] = true
			}
		}
		if a.err != nil || tuples != 2 {
			t.Fatalf("%s: %v, %d tuples", name, a.err, tuples)
		}
		for i := range len(p) {
			_, err := decodeEntry(p[:i])
			if ok[i] != (err == nil) {
				t.Errorf("%s cut at %d of %d bytes: error %v; want an error: %v", name, i, len(p), err, !ok[i])
			}
		}
	}
	for name, dg := range rec {
		for i := 1; i < len(dg); i++ {
			var st Stats
			seq := binary.NativeEndian.Uint32(dg[8:12])
			if _, err := st.handle(dg[:i], seq, nil, func(Entry) bool { return true }, func(Entry) error { return nil }); err == nil {
				t.Errorf("%s: datagram cut at %d of %d bytes decoded without an error", name, i, len(dg))
			}
		}
	}
}

// TestDecodeConstructed decodes what a kernel may send beside what Entry
// holds, for both families.
func TestDecodeConstructed(t *testing.T) {
	v6 := Entry{
		ID:       0xfedcba98,
		Orig:     tcp("[2001:db8::2]:40001", "[fd00::100:1]:443"),
		Reply:    tcp("[fd00::2]:443", "[2001:db8::2]:40001"),
		Status:   0x18e,
		TCPState: 3,
	}
	udp := Entry{
		ID:    5,
		Orig:  Tuple{Src: netip.MustParseAddrPort("10.0.0.1:53"), Dst: netip.MustParseAddrPort("10.0.0.2:5353"), Proto: unix.IPPROTO_UDP},
		Reply: Tuple{Src: netip.MustParseAddrPort("10.0.0.2:5353"), Dst: netip.MustParseAddrPort("10.0.0.1:53"), Proto: unix.IPPROTO_UDP},
	}
	for _, want := range []Entry{broken, v6, udp} {
		p := entryPayload(want)
		if want.Orig.Proto == unix.IPPROTO_UDP {
			// No protocol info for UDP; a zone instead.
			p = []byte{unix.AF_INET, 0, 0, 0}
			p = append(p, tupleAttr(ctaTupleOrig, want.Orig)...)
			p = append(p, tupleAttr(ctaTupleReply, want.Reply)...)
			p = append(p, attr(18 /* CTA_ZONE */, be16b(3))...)
			p = append(p, attr(ctaID, be32b(want.ID))...)
		}
		got, err := decodeEntry(p)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, got, equateAddrPorts); diff != "" {
			t.Errorf("(-want +got):\n%s", diff)
		}
	}
}

// TestDecodeMalformed feeds the decoder messages no kernel sends.
func TestDecodeMalformed(t *testing.T) {
	v4 := []byte{unix.AF_INET, 0, 0, 0}
	orig, reply := tupleAttr(ctaTupleOrig, broken.Orig), tupleAttr(ctaTupleReply, broken.Reply)
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	ip := func(typ uint16, v4src, v4dst []byte) []byte {
		return nest(typ, nest(ctaTupleIP, attr(ctaIPv4Src, v4src), attr(ctaIPv4Dst, v4dst)),
			nest(ctaTupleProto, attr(ctaProtoNum, []byte{6}), attr(ctaProtoSrc, be16b(1)), attr(ctaProtoDst, be16b(2))))
	}
	four := []byte{10, 0, 0, 1}
	badLen := cat(v4, orig, reply)
	binary.NativeEndian.PutUint16(badLen[4:], 2)
	tooLong := cat(v4, orig, reply)
	binary.NativeEndian.PutUint16(tooLong[4:], uint16(len(tooLong)))
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "shorter than its header"},
		{"short header", []byte{2, 0}, "shorter than its header"},
		{"unknown family", cat([]byte{7, 0, 0, 0}, orig, reply), "address family 7"},
		{"no tuples", cat(v4, attr(ctaID, be32b(1))), "without both tuples"},
		{"no reply tuple", cat(v4, orig), "without both tuples"},
		{"attribute shorter than its header", badLen, "attribute of length 2"},
		{"attribute longer than the message", tooLong, "attribute of length"},
		{"stray bytes", cat(v4, orig, reply, []byte{1, 2}), "stray bytes"},
		{"IPv6 address in IPv4", cat(v4, ip(ctaTupleOrig, make([]byte, 16), four), reply), "address of 16 bytes"},
		{"IPv4 address in IPv6", cat([]byte{unix.AF_INET6, 0, 0, 0}, ip(ctaTupleOrig, four, four), reply), "without both addresses"},
		{"one address", cat(v4, nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Src, four)), nest(ctaTupleProto, attr(ctaProtoNum, []byte{6}))), reply), "without both addresses"},
		{"no protocol", cat(v4, nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Src, four), attr(ctaIPv4Dst, four))), reply), "without addresses or protocol"},
		{"long protocol number", cat(v4, nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Src, four), attr(ctaIPv4Dst, four)), nest(ctaTupleProto, attr(ctaProtoNum, []byte{6, 0}))), reply), "protocol number of 2 bytes"},
		{"short port", cat(v4, nest(ctaTupleOrig, nest(ctaTupleIP, attr(ctaIPv4Src, four), attr(ctaIPv4Dst, four)), nest(ctaTupleProto, attr(ctaProtoNum, []byte{6}), attr(ctaProtoSrc, []byte{1}))), reply), "1 bytes where 2 belong"},
		{"short status", cat(v4, orig, reply, attr(ctaStatus, []byte{0, 0, 2})), "3 bytes where 4 belong"},
		{"long ID", cat(v4, orig, reply, attr(ctaID, make([]byte, 8))), "8 bytes where 4 belong"},
		{"long TCP state", cat(v4, orig, reply, nest(ctaProtoinfo, nest(ctaInfoTCP, attr(ctaTCPState, []byte{1, 1})))), "TCP state of 2 bytes"},
		{"broken TCP info", cat(v4, orig, reply, nest(ctaProtoinfo, nest(ctaInfoTCP, []byte{9, 0}))), "TCP protocol info"},
		{"broken nesting", cat(v4, nest(ctaTupleOrig, []byte{200, 0, 1, 0}), reply), "tuple"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeEntry(tc.b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v; want one saying %q", err, tc.want)
			}
		})
	}
}

// TestHandle checks what one datagram of a dump does: entries in order,
// the end, errors, other requests' messages, and the kernel's filter.
func TestHandle(t *testing.T) {
	other := broken
	other.ID, other.Reply.Src = 78, netip.MustParseAddrPort("10.96.0.9:443")
	replied := broken
	replied.ID, replied.Status = 79, broken.Status|StatusSeenReply
	f := Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("10.96.0.2")}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true}
	k := kernelFilterFor(f, unix.AF_INET)
	cat := func(ms ...[]byte) []byte {
		var b []byte
		for _, m := range ms {
			b = append(b, m...)
		}
		return b
	}
	done := nlMessage(unix.NLMSG_DONE, unix.NLM_F_MULTI, 9, make([]byte, 4))
	for _, tc := range []struct {
		name     string
		dg       []byte
		k        *kernelFilter
		wantIDs  []uint32
		wantDone bool
		wantErr  error
		want     Stats
	}{
		{
			name:     "entries and the end",
			dg:       cat(nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(broken)), nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(other)), nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(replied)), done),
			wantIDs:  []uint32{77},
			wantDone: true,
			want:     Stats{Received: 3, Matched: 1},
		},
		{
			name:    "what the kernel should have filtered",
			dg:      cat(nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(broken)), nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(other)), nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(replied))),
			k:       &k,
			wantIDs: []uint32{77},
			want:    Stats{Received: 3, Matched: 1, Excess: 2},
		},
		{
			name:    "another request's messages",
			dg:      cat(nlMessage(newMsg, unix.NLM_F_MULTI, 8, entryPayload(broken)), nlMessage(unix.NLMSG_DONE, unix.NLM_F_MULTI, 8, make([]byte, 4)), nlMessage(newMsg, unix.NLM_F_MULTI, 9, entryPayload(broken))),
			wantIDs: []uint32{77},
			want:    Stats{Received: 1, Matched: 1},
		},
		{
			name:     "another subsystem's and message types",
			dg:       cat(nlMessage(10<<8|6, unix.NLM_F_MULTI, 9, []byte{2, 0, 0, 0}), nlMessage(newMsg|2, 0, 9, entryPayload(broken)), done),
			wantDone: true,
		},
		{
			name:     "refused",
			dg:       errorMessage(9, unix.EINVAL),
			wantDone: true,
			wantErr:  kernelError{errno: unix.EINVAL},
		},
		{
			name:     "acknowledged",
			dg:       errorMessage(9, 0),
			wantDone: true,
		},
		{
			name:     "an error at the end",
			dg:       nlMessage(unix.NLMSG_DONE, unix.NLM_F_MULTI, 9, negErrno(unix.ENOBUFS)),
			wantDone: true,
			wantErr:  kernelError{errno: unix.ENOBUFS},
		},
		{
			name:     "a short end",
			dg:       nlMessage(unix.NLMSG_DONE, unix.NLM_F_MULTI, 9, []byte{0, 0}),
			wantDone: true,
			wantErr:  errors.New("netlink message of type 3 with 2 bytes"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var st Stats
			var ids []uint32
			gotDone, err := st.handle(tc.dg, 9, tc.k, f.Matches, func(e Entry) error {
				ids = append(ids, e.ID)
				return nil
			})
			if gotDone != tc.wantDone || (err == nil) != (tc.wantErr == nil) || (err != nil && err.Error() != tc.wantErr.Error()) {
				t.Errorf("done %v, error %v; want %v, %v", gotDone, err, tc.wantDone, tc.wantErr)
			}
			if diff := cmp.Diff(tc.wantIDs, ids); diff != "" {
				t.Errorf("entries handed on (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.want, st); diff != "" {
				t.Errorf("stats (-want +got):\n%s", diff)
			}
		})
	}

	if !isRefusal(kernelError{errno: unix.EOPNOTSUPP}) || !isRefusal(kernelError{errno: unix.EINVAL}) || isRefusal(kernelError{errno: unix.EPERM}) || isRefusal(unix.EINVAL) {
		t.Error("isRefusal must name the kernel's EINVAL and EOPNOTSUPP, and nothing else")
	}

	// An error of the callback ends the dump.
	stop := errors.New("stop")
	var st Stats
	calls := 0
	_, err := st.handle(cat(nlMessage(newMsg, 0, 9, entryPayload(broken)), nlMessage(newMsg, 0, 9, entryPayload(broken))), 9, nil, f.Matches, func(Entry) error {
		calls++
		return stop
	})
	if !errors.Is(err, stop) || calls != 1 {
		t.Errorf("after the callback failed: %d calls, %v; want 1, %v", calls, err, stop)
	}
}

// TestKernelFilterAttrs decodes the request attributes that ask the
// kernel to filter, as ctnetlink_parse_tuple_filter() reads them.
func TestKernelFilterAttrs(t *testing.T) {
	type request struct {
		Flags          uint32
		IPSrc          []byte
		IPType         uint16
		Proto          uint8
		Port           uint16
		Status, Mask   uint32
		HasStatus      bool
		OtherTupleAttr bool
	}
	read := func(t *testing.T, k kernelFilter) request {
		var b []byte
		for _, a := range k.attrs() {
			b = append(b, a.Serialize()...)
		}
		var r request
		a := attrs{b: b}
		for a.next() {
			switch a.typ {
			case ctaTupleReply:
				tup := attrs{b: a.val}
				for tup.next() {
					in := attrs{b: tup.val}
					for in.next() {
						switch {
						case tup.typ == ctaTupleIP:
							r.IPType, r.IPSrc = in.typ, in.val
						case tup.typ == ctaTupleProto && in.typ == ctaProtoNum:
							r.Proto = in.val[0]
						case tup.typ == ctaTupleProto && in.typ == ctaProtoSrc:
							r.Port = binary.BigEndian.Uint16(in.val)
						default:
							r.OtherTupleAttr = true
						}
					}
				}
			case ctaFilter:
				fl := attrs{b: a.val}
				for fl.next() {
					if fl.typ == ctaFilterReply {
						r.Flags = binary.NativeEndian.Uint32(fl.val)
					}
				}
			case ctaStatus:
				r.Status, r.HasStatus = binary.BigEndian.Uint32(a.val), true
			case ctaStatusMask:
				r.Mask = binary.BigEndian.Uint32(a.val)
			}
		}
		if a.err != nil {
			t.Fatal(a.err)
		}
		return r
	}
	for _, tc := range []struct {
		name string
		f    Filter
		want request
	}{
		{
			name: "one IPv4 address, unreplied",
			f:    Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("10.96.0.2")}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true},
			want: request{Flags: filterIPSrc | filterProtoNum | filterProtoSrc, IPType: ctaIPv4Src, IPSrc: []byte{10, 96, 0, 2}, Proto: 6, Port: 443, Mask: StatusSeenReply, HasStatus: true},
		},
		{
			name: "two IPv4 addresses",
			f:    Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("10.96.0.2"), netip.MustParseAddr("10.96.0.3")}, ReplySrcPort: 8443, Proto: unix.IPPROTO_TCP},
			want: request{Flags: filterProtoNum | filterProtoSrc, Proto: 6, Port: 8443},
		},
		{
			// ctnetlink matches IPv6 addresses the wrong way round: not
			// asked.
			name: "IPv6",
			f:    Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("fd00::2")}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true},
			want: request{Flags: filterProtoNum | filterProtoSrc, Proto: 6, Port: 443, Mask: StatusSeenReply, HasStatus: true},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fam, err := tc.f.family()
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, read(t, kernelFilterFor(tc.f, fam))); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestFilter(t *testing.T) {
	ours := netip.MustParseAddr("10.96.0.2")
	f := Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("10.96.0.9"), ours}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP, Unreplied: true}
	replied := broken
	replied.Status |= StatusSeenReply
	otherPort := broken
	otherPort.Reply.Src = netip.AddrPortFrom(ours, 444)
	otherAddr := broken
	otherAddr.Reply.Src = netip.MustParseAddrPort("10.96.0.3:443")
	udp := broken
	udp.Reply.Proto = unix.IPPROTO_UDP
	for _, tc := range []struct {
		name string
		e    Entry
		f    Filter
		want bool
	}{
		{"ours, unreplied", broken, f, true},
		{"ours, replied", replied, f, false},
		{"ours, replied, answered ones wanted", replied, Filter{ReplySrc: f.ReplySrc, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP}, true},
		{"another port", otherPort, f, false},
		{"another address", otherAddr, f, false},
		{"UDP", udp, f, false},
	} {
		if got := tc.f.Matches(tc.e); got != tc.want {
			t.Errorf("%s: Matches = %v, want %v", tc.name, got, tc.want)
		}
	}

	for _, tc := range []struct {
		addrs []string
		want  uint8
	}{
		{[]string{"10.96.0.2"}, unix.AF_INET},
		{[]string{"fd00::2", "fd00::3"}, unix.AF_INET6},
		{nil, 0},
		{[]string{"10.96.0.2", "fd00::2"}, 0},
		{[]string{"::ffff:10.96.0.2"}, 0},
	} {
		var addrs []netip.Addr
		for _, a := range tc.addrs {
			addrs = append(addrs, netip.MustParseAddr(a))
		}
		got, err := Filter{ReplySrc: addrs}.family()
		if got != tc.want || (err == nil) != (tc.want != 0) {
			t.Errorf("family of %v = %d, %v; want %d", tc.addrs, got, err, tc.want)
		}
	}
}
