package conntrack

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzDecode feeds arbitrary bytes to the decoder, both as one entry's
// payload and as a datagram of a dump. It must never panic, and what it
// accepts must be an entry of the message's family with both tuples.
//
//	go test ./internal/conntrack -run '^$' -fuzz FuzzDecode -fuzztime 30s
func FuzzDecode(f *testing.F) {
	for _, dg := range recorded(f) {
		f.Add(dg)
		if len(dg) > unix.NLMSG_HDRLEN {
			f.Add(dg[unix.NLMSG_HDRLEN:])
		}
	}
	f.Add(entryPayload(broken))
	f.Add(nlMessage(newMsg, unix.NLM_F_MULTI, 1, entryPayload(broken)))
	f.Add(errorMessage(1, unix.EINVAL))
	match := Filter{ReplySrc: []netip.Addr{netip.MustParseAddr("10.96.0.2")}, ReplySrcPort: 443, Proto: unix.IPPROTO_TCP}
	k := kernelFilterFor(match, unix.AF_INET)
	f.Fuzz(func(t *testing.T, b []byte) {
		if e, err := decodeEntry(b); err == nil {
			is6 := b[0] == unix.AF_INET6
			for _, a := range []netip.AddrPort{e.Orig.Src, e.Orig.Dst, e.Reply.Src, e.Reply.Dst} {
				if !a.Addr().IsValid() || a.Addr().Is6() != is6 {
					t.Fatalf("decoded %+v from a family %d message", e, b[0])
				}
			}
		}
		var seq uint32
		if len(b) >= unix.NLMSG_HDRLEN {
			seq = binary.NativeEndian.Uint32(b[8:12])
		}
		var st Stats
		_, _ = st.handle(b, seq, &k, match.Matches, func(e Entry) error {
			if !match.Matches(e) {
				t.Fatalf("handed on %+v, which the filter excludes", e)
			}
			return nil
		})
		if st.Matched > st.Received || st.Excess > st.Received {
			t.Fatalf("stats %+v", st)
		}
	})
}
