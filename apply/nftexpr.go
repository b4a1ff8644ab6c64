package apply

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Our rules as nftables expressions.
//
// iptables-nft 1.8.9 stores "-A C -d 10.96.0.2/32 -p tcp -m tcp --dport 443
// -j NOTRACK" as
//
//	meta l4proto => reg 1; cmp eq reg 1 06
//	payload network header +16, 4 bytes => reg 1; cmp eq reg 1 0a600002
//	payload transport header +2, 2 bytes => reg 1; cmp eq reg 1 01bb
//	counter; target CT revision 2 with the NOTRACK flags
//
// and "-j ACCEPT" as an accept verdict. Reading that back in-process lets a
// sync confirm that our chains are in place without running iptables-nft.
// The comparison is exact: the expressions of every rule are written out
// in one canonical text form (nfnl.ExprText) and compared with what our
// rendered rules would be (wantExprs). Anything else, including what
// another iptables release might store for the same rule, does not match,
// and the chain is then listed with iptables-nft and compared as text, as
// before: this is a shortcut for the common case, never the judge of drift.

// Values our rules hold (linux/netfilter/nf_tables.h, xt_CT.h).
const (
	nftMetaL4Proto = 16
	nftRegVerdict  = 0
	nfAccept       = 1
	xtCTNotrack    = 1<<0 | 1<<1 // XT_CT_NOTRACK | XT_CT_NOTRACK_ALIAS: "-j NOTRACK"
)

// wantExprs returns the canonical expressions (as nfnl.ExprText writes them)
// that iptables-nft 1.8.9 stores for rule, one of our rendered rules, or
// false when rule does not have the one shape this knows:
//
//	-A CHAIN -d|-s PREFIX -p tcp -m tcp --dport|--sport PORT -j NOTRACK|ACCEPT
func wantExprs(f render.Family, rule string) ([]string, bool) {
	w := strings.Fields(rule)
	if len(w) != 12 || w[0] != "-A" || w[4] != "-p" || w[5] != "tcp" || w[6] != "-m" || w[7] != "tcp" || w[10] != "-j" {
		return nil, false
	}
	prefix, err := netip.ParsePrefix(w[3])
	if err != nil || prefix.Bits() != prefix.Addr().BitLen() || prefix.Addr().Is4() != (f == render.IPv4) {
		return nil, false
	}
	port, err := strconv.ParseUint(w[9], 10, 16)
	if err != nil {
		return nil, false
	}
	addrOffset := map[string]map[render.Family]int{"-s": {render.IPv4: 12, render.IPv6: 8}, "-d": {render.IPv4: 16, render.IPv6: 24}}[w[2]]
	portOffset := map[string]int{"--sport": 0, "--dport": 2}
	po, ok := portOffset[w[8]]
	if addrOffset == nil || !ok {
		return nil, false
	}
	addr := prefix.Addr().AsSlice()
	out := []string{
		fmt.Sprintf("meta reg=1 key=%d", nftMetaL4Proto),
		"cmp reg=1 op=0 data=06",
		fmt.Sprintf("payload reg=1 base=1 offset=%d len=%d", addrOffset[f], len(addr)),
		"cmp reg=1 op=0 data=" + hex.EncodeToString(addr),
		fmt.Sprintf("payload reg=1 base=2 offset=%d len=2", po),
		"cmp reg=1 op=0 data=" + hex.EncodeToString(binary.BigEndian.AppendUint16(nil, uint16(port))),
		"counter",
	}
	switch w[11] {
	case "ACCEPT":
		out = append(out, fmt.Sprintf("immediate reg=%d verdict=%d", nftRegVerdict, nfAccept))
	case "NOTRACK":
		// struct xt_ct_target_info_v1 (72 bytes): the flags, then zone,
		// events, helper, timeout and the kernel's pointer, all unset.
		info := make([]byte, 72)
		binary.NativeEndian.PutUint16(info, xtCTNotrack)
		out = append(out, "target name=CT rev=2 info="+hex.EncodeToString(info))
	default:
		return nil, false
	}
	for i := range out {
		out[i] = nfnl.Canonical(out[i])
	}
	return out, true
}
