package nfnl

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Expression attributes (linux/netfilter/nf_tables.h).
const (
	nftaMetaDreg      = 1
	nftaMetaKey       = 2
	nftaCmpSreg       = 1
	nftaCmpOp         = 2
	nftaCmpData       = 3
	nftaDataValue     = 1
	nftaPayloadDreg   = 1
	nftaPayloadBase   = 2
	nftaPayloadOffset = 3
	nftaPayloadLen    = 4
	nftaTargetName    = 1
	nftaTargetRev     = 2
	nftaTargetInfo    = 3
	nftaImmediateDreg = 1
	nftaCounterBytes  = 1
	nftaCounterPkts   = 2
)

// ExprText writes one expression (its name and its NFTA_EXPR_DATA) in a
// canonical text form: "name attr=value ...", attributes sorted, counter
// values left out. An attribute it does not know is
// written as such, so that the expression matches nothing we render.
func ExprText(name string, data []byte) (string, error) {
	attrs, err := nl.ParseRouteAttr(data)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString(name)
	for _, a := range attrs {
		typ := a.Attr.Type &^ unix.NLA_F_NESTED
		v := a.Value
		switch {
		case name == "counter" && (typ == nftaCounterBytes || typ == nftaCounterPkts):
			continue // the counts change with traffic
		case name == "meta" && typ == nftaMetaKey && len(v) == 4:
			fmt.Fprintf(&b, " key=%d", binary.BigEndian.Uint32(v))
		case name == "meta" && typ == nftaMetaDreg, name == "payload" && typ == nftaPayloadDreg,
			name == "cmp" && typ == nftaCmpSreg, name == "immediate" && typ == nftaImmediateDreg:
			if len(v) != 4 {
				return "", fmt.Errorf("%s: register of %d bytes", name, len(v))
			}
			fmt.Fprintf(&b, " reg=%d", binary.BigEndian.Uint32(v))
		case name == "cmp" && typ == nftaCmpOp && len(v) == 4:
			fmt.Fprintf(&b, " op=%d", binary.BigEndian.Uint32(v))
		case name == "cmp" && typ == nftaCmpData:
			value, err := dataValue(v)
			if err != nil {
				return "", err
			}
			b.WriteString(" data=" + value)
		case name == "payload" && (typ == nftaPayloadBase || typ == nftaPayloadOffset || typ == nftaPayloadLen) && len(v) == 4:
			fmt.Fprintf(&b, " %s=%d", [...]string{nftaPayloadBase: "base", nftaPayloadOffset: "offset", nftaPayloadLen: "len"}[typ], binary.BigEndian.Uint32(v))
		case name == "target" && typ == nftaTargetName:
			b.WriteString(" name=" + cString(v))
		case name == "target" && typ == nftaTargetRev && len(v) == 4:
			fmt.Fprintf(&b, " rev=%d", binary.BigEndian.Uint32(v))
		case name == "target" && typ == nftaTargetInfo:
			b.WriteString(" info=" + hex.EncodeToString(v))
		case name == "immediate" && typ == nftaImmediateData:
			verdict, err := verdictCode(v)
			if err != nil {
				return "", err
			}
			b.WriteString(" verdict=" + verdict)
		default:
			fmt.Fprintf(&b, " attr%d=%s", typ, hex.EncodeToString(v))
		}
	}
	return Canonical(b.String()), nil
}

// Canonical sorts the attributes of an expression written as "name a=1
// b=2": the order in which a kernel dumps them carries no meaning.
func Canonical(expr string) string {
	w := strings.Fields(expr)
	if len(w) > 1 {
		slices.Sort(w[1:])
	}
	return strings.Join(w, " ")
}

// dataValue returns the bytes of an NFTA_DATA_VALUE in hex.
func dataValue(b []byte) (string, error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return "", err
	}
	for _, a := range attrs {
		if a.Attr.Type&^unix.NLA_F_NESTED == nftaDataValue {
			return hex.EncodeToString(a.Value), nil
		}
	}
	return "?", nil
}

// verdictCode returns an immediate expression's verdict code, with ":CHAIN"
// for a jump or goto, or "?" when its data is not a verdict.
func verdictCode(b []byte) (string, error) {
	code, chain, found, err := verdictOf(b)
	if err != nil || !found {
		return "?", err
	}
	if chain != "" {
		return strconv.Itoa(int(code)) + ":" + chain, nil
	}
	return strconv.Itoa(int(code)), nil
}
