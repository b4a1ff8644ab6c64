package netnstest

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// ConntrackEntry is one line of `conntrack -L -o id`, the program's view of
// one conntrack entry.
type ConntrackEntry struct {
	// Line is the line as printed.
	Line string
	// Proto is the protocol's name ("tcp", "udp", ...) and ProtoNum its
	// number.
	Proto    string
	ProtoNum uint8
	// State is the TCP state ("SYN_SENT", ...); "" for other protocols.
	State string
	// OrigSrc and OrigDst are the original direction's source and
	// destination, ReplySrc and ReplyDst the reply direction's.
	OrigSrc, OrigDst, ReplySrc, ReplyDst netip.AddrPort
	// Unreplied is set for entries printed with [UNREPLIED].
	Unreplied bool
	// ID is the entry's conntrack ID.
	ID uint32
}

// Conntrack lists the conntrack entries of family ("ipv4" or "ipv6") in the
// namespace with the conntrack program, which must be installed. A line it
// cannot parse fails the test.
func (n *NS) Conntrack(t testing.TB, family string) []ConntrackEntry {
	t.Helper()
	var out []ConntrackEntry
	for _, line := range strings.Split(n.Run(t, "conntrack", "-L", "-f", family, "-o", "id"), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		e, err := ParseConntrackLine(line)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// ParseConntrackLine parses one line of `conntrack -L -o id`, such as
//
//	tcp 6 119 SYN_SENT src=A dst=B sport=1 dport=2 [UNREPLIED] src=B dst=A sport=2 dport=1 mark=0 use=1 id=7
//	udp 17 29 src=A dst=B sport=1 dport=2 [UNREPLIED] src=B dst=A sport=2 dport=1 mark=0 use=1 id=8
func ParseConntrackLine(line string) (ConntrackEntry, error) {
	e := ConntrackEntry{Line: line}
	f := strings.Fields(line)
	if len(f) < 3 {
		return e, fmt.Errorf("conntrack line %q: too short", line)
	}
	e.Proto = f[0]
	num, err := strconv.ParseUint(f[1], 10, 8)
	if err != nil {
		return e, fmt.Errorf("conntrack line %q: protocol number: %w", line, err)
	}
	e.ProtoNum = uint8(num)
	rest := f[3:] // after the timeout
	if e.Proto == "tcp" {
		if len(rest) == 0 {
			return e, fmt.Errorf("conntrack line %q: no TCP state", line)
		}
		e.State, rest = rest[0], rest[1:]
	}
	// Each direction: src=, dst=, then ports for protocols with ports.
	tuples := [2][2]*netip.AddrPort{{&e.OrigSrc, &e.OrigDst}, {&e.ReplySrc, &e.ReplyDst}}
	dir := -1
	for _, w := range rest {
		k, v, _ := strings.Cut(w, "=")
		if k == "src" {
			dir++
		}
		var err error
		switch k {
		case "src", "dst", "sport", "dport":
			if dir < 0 || dir > 1 {
				return e, fmt.Errorf("conntrack line %q: %s outside the two directions", line, w)
			}
			end := tuples[dir][0]
			if k == "dst" || k == "dport" {
				end = tuples[dir][1]
			}
			if k == "src" || k == "dst" {
				var a netip.Addr
				a, err = netip.ParseAddr(v)
				*end = netip.AddrPortFrom(a, end.Port())
			} else {
				var p uint64
				p, err = strconv.ParseUint(v, 10, 16)
				*end = netip.AddrPortFrom(end.Addr(), uint16(p))
			}
		case "id":
			var id uint64
			id, err = strconv.ParseUint(v, 10, 32)
			e.ID = uint32(id)
		case "[UNREPLIED]":
			e.Unreplied = true
		}
		if err != nil {
			return e, fmt.Errorf("conntrack line %q: %s: %w", line, w, err)
		}
	}
	if dir != 1 {
		return e, fmt.Errorf("conntrack line %q: want two directions", line)
	}
	return e, nil
}
