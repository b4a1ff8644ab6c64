package xtables

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Table is what a table holds of the chains a walk looks for.
type Table struct {
	// Chains maps each chain looked for that exists to its rules, in
	// order, as iptables-legacy-save prints them ("-A CHAIN ..."); an
	// empty chain maps to an empty slice.
	Chains map[string][]string
	// Jumps maps each built-in chain to its rules that jump or go to a
	// chain looked for, as iptables-legacy-save prints them.
	Jumps map[string][]string
	// Unrecognised, when not "", says why the walk could not tell the text
	// of some rule in a chain looked for, or of some rule jumping to one:
	// a match, target or field this package does not render. Chains and
	// Jumps are then incomplete; only iptables-legacy-save can tell.
	Unrecognised string
}

// Entry layout (linux/netfilter_ipv4/ip_tables.h, ip6_tables.h,
// linux/netfilter/x_tables.h), the same on every 64-bit and 32-bit ABI
// Linux runs iptables on: the entries are 8-byte aligned.
type layout struct {
	entrySize                int // sizeof(struct ipt_entry)
	addrLen                  int
	iniface, outiface        int // offsets of the interface names and masks
	proto, flags, invflags   int
	tos                      int // ip6t_ip6.tos; -1 for IPv4
	targetOffset, nextOffset int
	protoFlag                uint8 // IP6T_F_PROTO: set by -p on IPv6
	gotoFlag                 uint8 // IPT_F_GOTO, IP6T_F_GOTO
}

var layouts = map[Family]layout{
	IPv4: {entrySize: 112, addrLen: 4, iniface: 16, outiface: 32, proto: 80, flags: 82, invflags: 83, tos: -1,
		targetOffset: 88, nextOffset: 90, gotoFlag: 0x02},
	IPv6: {entrySize: 168, addrLen: 16, iniface: 64, outiface: 80, proto: 128, flags: 131, invflags: 132, tos: 130,
		targetOffset: 140, nextOffset: 142, protoFlag: 0x01, gotoFlag: 0x04},
}

var hookNames = [numHooks]string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

// xt_entry_match and xt_entry_target: a u16 size, a 29-byte name, a u8
// revision, then the data.
const (
	extHeader = 32
	extName   = 29

	verdictAccept = -2 // -NF_ACCEPT - 1
	verdictDrop   = -1 // -NF_DROP - 1
	verdictReturn = -5 // XT_RETURN: -NF_REPEAT - 1

	standardTargetSize = extHeader + 8 // xt_standard_target, aligned
	errorTargetSize    = extHeader + 32
	ctTargetSize       = extHeader + 72 // xt_ct_target_info_v1, aligned
	tcpMatchSize       = extHeader + 16 // xt_tcp, aligned

	ctNotrack      = 1 << 0 // XT_CT_NOTRACK
	ctNotrackAlias = 1 << 1 // XT_CT_NOTRACK_ALIAS: written for "-j NOTRACK"
	protoTCP       = 6
)

// entry is one parsed entry. Its slices point into the table's entries.
type entry struct {
	off, next int
	b         []byte // the whole entry
	tname     []byte // the target's name
	rev       uint8
	tdata     []byte // the target's data
	verdict   int32  // standard target only
}

func (e entry) is(target string) bool { return string(e.tname) == target }

// Walk reads the entries b of a table of family f, laid out as in (what
// Socket.Entries hands over), and returns what it holds of the chains ours
// accepts. It returns an error, never a partial answer, for entries that
// are not well formed: truncated, overlapping, or at odds with in. It
// keeps no slice of b, and allocates only for what it returns and one
// small record per user chain: a table of tens of megabytes is stepped
// over, not copied.
func Walk(f Family, in TableInfo, b []byte, ours func(chain string) bool) (Table, error) {
	l, ok := layouts[f]
	if !ok {
		return Table{}, fmt.Errorf("unknown family %d", int(f))
	}
	if int64(in.Size) != int64(len(b)) {
		return Table{}, fmt.Errorf("entries are %d bytes, the table's info says %d", len(b), in.Size)
	}

	// First pass: check every entry's bounds and find where each chain
	// starts: built-in chains at their hook entries, user chains at their
	// ERROR-target heads; the table ends with an ERROR target of its own.
	type bound struct {
		off     int // the hook entry, the head, or the end marker
		first   int // the chain's first entry (rule or end)
		name    string
		builtin bool
		hook    int
	}
	var bounds []bound
	hookAt := map[int]int{}
	underflowAt := map[int]int{}
	for h := range numHooks {
		if in.ValidHooks&(1<<h) == 0 {
			continue
		}
		if _, dup := hookAt[int(in.HookEntry[h])]; dup {
			return Table{}, fmt.Errorf("two built-in chains start at %d", in.HookEntry[h])
		}
		hookAt[int(in.HookEntry[h])] = h
		underflowAt[int(in.Underflow[h])] = h
	}
	seenHook, seenUnderflow := 0, 0
	end, n := -1, 0
	for off := 0; off < len(b); {
		e, err := l.parse(b, off)
		if err != nil {
			return Table{}, err
		}
		n++
		if h, ok := hookAt[off]; ok {
			seenHook++
			bounds = append(bounds, bound{off: off, first: off, name: hookNames[h], builtin: true, hook: h})
		}
		if _, ok := underflowAt[off]; ok {
			seenUnderflow++
		}
		if e.is("ERROR") {
			name := cString(e.tdata)
			switch {
			case off+e.next == len(b):
				if name != "ERROR" {
					return Table{}, fmt.Errorf("entry at %d: the table ends with chain head %q, not its end marker", off, name)
				}
				end = off
			case name == "" || name == "ERROR":
				return Table{}, fmt.Errorf("entry at %d: an end marker in the middle of the table", off)
			default:
				bounds = append(bounds, bound{off: off, first: off + e.next, name: name})
			}
		}
		off += e.next
	}
	switch {
	case n == 0:
		return Table{}, errors.New("no entries")
	case end < 0:
		return Table{}, errors.New("the entries do not end with the table's end marker")
	case n != int(in.NumEntries):
		return Table{}, fmt.Errorf("%d entries, the table's info says %d", n, in.NumEntries)
	case seenHook != len(hookAt) || seenUnderflow != len(underflowAt):
		return Table{}, errors.New("a built-in chain's start or policy is not at an entry")
	}
	slices.SortFunc(bounds, func(a, b bound) int { return a.off - b.off })
	starts := map[int]string{} // a user chain's first entry -> its name
	for _, c := range bounds {
		if !c.builtin {
			starts[c.first] = c.name
		}
	}

	t := Table{Chains: map[string][]string{}, Jumps: map[string][]string{}}
	unrecognised := func(why string) {
		if t.Unrecognised == "" {
			t.Unrecognised = why
		}
	}
	// Second pass, over our chains and the built-in chains only: each
	// chain's last entry is its policy (built-in) or its RETURN (user
	// chain); the rules come before.
	for i, c := range bounds {
		mine := !c.builtin && ours(c.name)
		if c.builtin && ours(c.name) {
			return Table{}, fmt.Errorf("built-in chain %s cannot be one of those looked for", c.name)
		}
		if !mine && !c.builtin {
			continue
		}
		stop := end
		if i+1 < len(bounds) {
			stop = bounds[i+1].off
		}
		if c.first >= stop {
			return Table{}, fmt.Errorf("chain %s has no end entry", c.name)
		}
		var lines []string
		for off := c.first; off < stop; {
			e, err := l.parse(b, off)
			if err != nil {
				return Table{}, err
			}
			off += e.next
			if off == stop { // the chain's end
				if c.builtin && int(in.Underflow[c.hook]) != e.off {
					return Table{}, fmt.Errorf("built-in chain %s: its policy is at %d, not at its last entry %d", c.name, in.Underflow[c.hook], e.off)
				}
				if !c.builtin && (!e.is("") || e.verdict != verdictReturn) {
					return Table{}, fmt.Errorf("chain %s does not end in a RETURN entry", c.name)
				}
				break
			}
			if off > stop {
				return Table{}, fmt.Errorf("entry at %d: crosses into the next chain", e.off)
			}
			if mine {
				if t.Unrecognised != "" {
					continue
				}
				text, why := l.text(c.name, e, starts)
				if why != "" {
					unrecognised(fmt.Sprintf("rule %d of chain %s: %s", len(lines)+1, c.name, why))
				}
				lines = append(lines, text)
				continue
			}
			if !e.is("") || e.verdict < 0 || !ours(starts[int(e.verdict)]) {
				continue
			}
			text, why := l.text(c.name, e, starts)
			if why != "" {
				unrecognised(fmt.Sprintf("a rule of chain %s jumping to %s: %s", c.name, starts[int(e.verdict)], why))
				continue
			}
			t.Jumps[c.name] = append(t.Jumps[c.name], text)
		}
		if mine {
			if lines == nil {
				lines = []string{}
			}
			t.Chains[c.name] = lines
		}
	}
	if t.Unrecognised != "" {
		// What was read is incomplete: hand over nothing that could pass
		// for the state of the table.
		return Table{Unrecognised: t.Unrecognised}, nil
	}
	return t, nil
}

// parse reads the entry at off, checking that it lies within b.
func (l layout) parse(b []byte, off int) (entry, error) {
	if len(b)-off < l.entrySize {
		return entry{}, fmt.Errorf("entry at %d: truncated header (%d bytes left)", off, len(b)-off)
	}
	to := int(binary.NativeEndian.Uint16(b[off+l.targetOffset:]))
	next := int(binary.NativeEndian.Uint16(b[off+l.nextOffset:]))
	switch {
	case next%8 != 0 || to%8 != 0:
		return entry{}, fmt.Errorf("entry at %d: misaligned offsets (target %d, next %d)", off, to, next)
	case to < l.entrySize || to+extHeader > next:
		return entry{}, fmt.Errorf("entry at %d: target offset %d outside the entry (%d bytes)", off, to, next)
	case next > len(b)-off:
		return entry{}, fmt.Errorf("entry at %d: %d bytes, only %d left", off, next, len(b)-off)
	}
	e := entry{off: off, next: next, b: b[off : off+next]}
	tb := e.b[to:]
	size := int(binary.NativeEndian.Uint16(tb))
	if size != len(tb) {
		return entry{}, fmt.Errorf("entry at %d: target of %d bytes in %d", off, size, len(tb))
	}
	e.tname, e.rev, e.tdata = tb[2:2+extName], tb[2+extName], tb[extHeader:]
	if i := bytes.IndexByte(e.tname, 0); i >= 0 {
		e.tname = e.tname[:i]
	}
	switch {
	case e.is(""):
		if size != standardTargetSize {
			return entry{}, fmt.Errorf("entry at %d: standard target of %d bytes", off, size)
		}
		e.verdict = int32(binary.NativeEndian.Uint32(e.tdata))
		if e.verdict >= 0 && int(e.verdict) >= len(b) {
			return entry{}, fmt.Errorf("entry at %d: jump to %d, beyond the table", off, e.verdict)
		}
	case e.is("ERROR"):
		if size != errorTargetSize {
			return entry{}, fmt.Errorf("entry at %d: ERROR target of %d bytes", off, size)
		}
	}
	return e, nil
}

// text returns rule e of chain as iptables-legacy-save prints it, or why
// it cannot: only what the rules we write use is rendered (addresses,
// -p tcp, the tcp match's ports; ACCEPT, DROP, RETURN, NOTRACK and plain
// jumps), the rest is left to iptables-legacy-save.
func (l layout) text(chain string, e entry, starts map[int]string) (string, string) {
	b := e.b
	var s strings.Builder
	s.WriteString("-A " + chain)
	for i, opt := range []string{"-s", "-d"} {
		addr := b[i*l.addrLen : (i+1)*l.addrLen]
		mask := b[(2+i)*l.addrLen : (3+i)*l.addrLen]
		text, why := prefixText(addr, mask)
		if why != "" {
			return "", why
		}
		if text != "" {
			s.WriteString(" " + opt + " " + text)
		}
	}
	if !zero(b[l.iniface:l.proto]) {
		return "", "interface match"
	}
	proto := binary.NativeEndian.Uint16(b[l.proto:])
	flags, inv := b[l.flags], b[l.invflags]
	if l.tos >= 0 && b[l.tos] != 0 {
		return "", "tos"
	}
	if inv != 0 {
		return "", "inverted field"
	}
	wantFlags := uint8(0)
	switch proto {
	case 0:
	case protoTCP:
		s.WriteString(" -p tcp")
		wantFlags = l.protoFlag
	default:
		return "", "protocol " + strconv.Itoa(int(proto))
	}
	jumpFlags := flags &^ wantFlags
	if flags&wantFlags != wantFlags || jumpFlags != 0 {
		return "", fmt.Sprintf("flags %#x", flags)
	}
	to := int(binary.NativeEndian.Uint16(b[l.targetOffset:]))
	for m := l.entrySize; m < to; {
		if to-m < extHeader {
			return "", "truncated match"
		}
		size := int(binary.NativeEndian.Uint16(b[m:]))
		if size < extHeader || size > to-m || size%8 != 0 {
			return "", "malformed match"
		}
		name, rev, data := cString(b[m+2:m+2+extName]), b[m+2+extName], b[m+extHeader:m+size]
		if name != "tcp" || rev != 0 || size != tcpMatchSize || proto != protoTCP || m != l.entrySize {
			return "", fmt.Sprintf("match %s revision %d", name, rev)
		}
		text, why := tcpText(data)
		if why != "" {
			return "", why
		}
		s.WriteString(" -m tcp" + text)
		m += size
	}
	switch {
	case e.is(""):
		switch v := e.verdict; {
		case v == verdictAccept:
			s.WriteString(" -j ACCEPT")
		case v == verdictDrop:
			s.WriteString(" -j DROP")
		case v == verdictReturn:
			s.WriteString(" -j RETURN")
		case v >= 0 && starts[int(v)] != "":
			s.WriteString(" -j " + starts[int(v)])
		default:
			return "", fmt.Sprintf("verdict %d", v)
		}
	case e.is("CT"):
		if e.rev != 2 || len(e.tdata) != ctTargetSize-extHeader ||
			binary.NativeEndian.Uint16(e.tdata) != ctNotrack|ctNotrackAlias || !zero(e.tdata[2:]) {
			return "", fmt.Sprintf("target CT revision %d other than NOTRACK", e.rev)
		}
		s.WriteString(" -j NOTRACK")
	default:
		return "", fmt.Sprintf("target %s revision %d", e.tname, e.rev)
	}
	return s.String(), ""
}

// prefixText returns "ADDR/LEN" for an address and a contiguous mask, ""
// for none, or why it cannot be printed as iptables does.
func prefixText(addr, mask []byte) (string, string) {
	bits := 0
	for i, m := range mask {
		ones := 0
		for ones < 8 && m&(0x80>>ones) != 0 {
			ones++
		}
		if m != byte(0xff<<(8-ones)) {
			return "", "non-contiguous mask"
		}
		if ones < 8 && !zero(mask[i+1:]) {
			return "", "non-contiguous mask"
		}
		bits += ones
		if ones < 8 {
			break
		}
	}
	for i := range addr {
		if addr[i]&^mask[i] != 0 {
			return "", "address outside its mask"
		}
	}
	if bits == 0 {
		return "", ""
	}
	a, _ := netip.AddrFromSlice(addr)
	if a.Is6() && zero(addr[:12]) && !zero(addr[12:14]) {
		// inet_ntop prints these as ::a.b.c.d, Go does not.
		return "", "IPv4-compatible IPv6 address"
	}
	return a.String() + "/" + strconv.Itoa(bits), ""
}

// tcpText renders xt_tcp: source and destination port ranges, an option,
// flags and inversions; only ports are rendered.
func tcpText(d []byte) (string, string) {
	if !zero(d[8:]) {
		return "", "tcp match with options, flags or inversions"
	}
	var s strings.Builder
	for i, opt := range []string{"--sport", "--dport"} {
		lo, hi := binary.NativeEndian.Uint16(d[4*i:]), binary.NativeEndian.Uint16(d[4*i+2:])
		switch {
		case lo == 0 && hi == 0xffff:
		case lo == hi:
			s.WriteString(" " + opt + " " + strconv.Itoa(int(lo)))
		case lo < hi:
			s.WriteString(" " + opt + " " + strconv.Itoa(int(lo)) + ":" + strconv.Itoa(int(hi)))
		default:
			return "", "tcp port range " + strconv.Itoa(int(lo)) + ":" + strconv.Itoa(int(hi))
		}
	}
	return s.String(), ""
}

func zero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
