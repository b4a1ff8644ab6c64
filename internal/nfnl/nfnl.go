// Package nfnl reads what iptables-nft keeps in the kernel over nfnetlink
// (NETLINK_NETFILTER, the nf_tables subsystem), in process: whether a chain
// exists, the rules of a chain as their expressions or their verdicts, and
// the ruleset generation. It encodes requests and decodes replies; it does
// not decide what a rule means to its caller. It never logs.
package nfnl

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Proto is an nftables family: the one iptables-nft uses for IPv4 or for
// IPv6.
type Proto uint8

// The families iptables-nft writes to.
const (
	IPv4 Proto = unix.NFPROTO_IPV4
	IPv6 Proto = unix.NFPROTO_IPV6
)

// Conn reads the nftables ruleset of one network namespace. Each call opens
// its own socket.
type Conn struct {
	// NS is the network namespace; netns.None() is the current one.
	NS netns.NsHandle
}

// Rule is what Jumps tells of one rule.
type Rule struct {
	// Verdict is "jump" or "goto" when the rule ends in one, else "".
	Verdict string
	// Target is the chain a jump or goto leads to.
	Target string
	// Bare is set when the rule does nothing but count and jump: what
	// iptables-nft makes of "-A CHAIN -j TARGET".
	Bare bool
}

// nftables netlink message types and attributes (linux/netfilter/nf_tables.h).
const (
	nftMsgNewChain = 3
	nftMsgGetChain = 4
	nftMsgNewRule  = 6
	nftMsgGetRule  = 7

	nftaChainTable = 1
	nftaChainName  = 3

	nftaRuleTable       = 1
	nftaRuleChain       = 2
	nftaRuleExpressions = 4
	nftaListElem        = 1
	nftaExprName        = 1
	nftaExprData        = 2
	nftaImmediateData   = 2
	nftaDataVerdict     = 2
	nftaVerdictCode     = 1
	nftaVerdictChain    = 2

	nftJump = -3 // NFT_JUMP
	nftGoto = -4 // NFT_GOTO
)

// HasChain reports whether chain exists in table of family p (false, nil
// when the table does not exist either).
func (c Conn) HasChain(p Proto, table, chain string) (bool, error) {
	found := false
	err := request(c.NS, nftMsgGetChain, false, uint8(p), func() { found = false }, func(m message) error {
		found = found || m.typ == nftMsgNewChain
		return nil
	}, nl.NewRtAttr(nftaChainTable, nl.ZeroTerminated(table)), nl.NewRtAttr(nftaChainName, nl.ZeroTerminated(chain)))
	if errors.Is(err, unix.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("looking up nftables chain %s in table %s: %w", chain, table, err)
	}
	return found, nil
}

// Jumps returns, in order, the rules of chain in table of family p that end
// in a jump or goto, and how many rules the chain has in all; none when the
// table or chain does not exist.
func (c Conn) Jumps(p Proto, table, chain string) (jumps []Rule, total int, err error) {
	// Each reply is parsed as it arrives and only jumps are kept: a
	// built-in chain may hold thousands of rules.
	err = request(c.NS, nftMsgGetRule, true, uint8(p), func() { jumps, total = nil, 0 }, func(m message) error {
		if m.typ != nftMsgNewRule {
			return nil
		}
		rule, ok, err := parseRule(m.data, table, chain)
		if ok {
			total++
			if rule.Verdict != "" {
				jumps = append(jumps, rule)
			}
		}
		return err
	}, nl.NewRtAttr(nftaRuleTable, nl.ZeroTerminated(table)), nl.NewRtAttr(nftaRuleChain, nl.ZeroTerminated(chain)))
	if errors.Is(err, unix.ENOENT) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("listing nftables chain %s in table %s: %w", chain, table, err)
	}
	return jumps, total, nil
}

// Exprs returns the expressions of each rule of chain in table of family
// p, in order and in the canonical form of ExprText; none when the table or
// chain does not exist.
func (c Conn) Exprs(p Proto, table, chain string) (rules [][]string, err error) {
	err = request(c.NS, nftMsgGetRule, true, uint8(p), func() { rules = nil }, func(m message) error {
		if m.typ != nftMsgNewRule {
			return nil
		}
		exprs, ok, err := ruleExprs(m.data, table, chain)
		if ok {
			rules = append(rules, exprs)
		}
		return err
	}, nl.NewRtAttr(nftaRuleTable, nl.ZeroTerminated(table)), nl.NewRtAttr(nftaRuleChain, nl.ZeroTerminated(chain)))
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing nftables chain %s in table %s: %w", chain, table, err)
	}
	return rules, nil
}

// ruleExprs returns the expressions of one NFT_MSG_NEWRULE payload in the
// form of ExprText; ok is false for a rule of another table or chain.
func ruleExprs(b []byte, table, chain string) (exprs []string, ok bool, err error) {
	elems, ok, err := ruleElems(b, table, chain)
	if !ok || err != nil {
		return nil, ok, err
	}
	for _, e := range elems {
		name, data, err := exprNameData(e)
		if err != nil {
			return nil, false, err
		}
		text, err := ExprText(name, data)
		if err != nil {
			return nil, false, fmt.Errorf("expression %s: %w", name, err)
		}
		exprs = append(exprs, text)
	}
	return exprs, true, nil
}

// ruleElems returns the expressions (each an NFTA_LIST_ELEM's payload) of
// one NFT_MSG_NEWRULE payload; ok is false for a rule of another table or
// chain: kernels that do not filter a dump by chain send every rule of the
// family.
func ruleElems(b []byte, table, chain string) (elems [][]byte, ok bool, err error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return nil, false, err
	}
	var exprs []byte
	for _, a := range attrs {
		switch a.Attr.Type &^ unix.NLA_F_NESTED {
		case nftaRuleTable:
			if cString(a.Value) != table {
				return nil, false, nil
			}
		case nftaRuleChain:
			if cString(a.Value) != chain {
				return nil, false, nil
			}
		case nftaRuleExpressions:
			exprs = a.Value
		}
	}
	list, err := nl.ParseRouteAttr(exprs)
	if err != nil {
		return nil, false, err
	}
	for _, e := range list {
		if e.Attr.Type&^unix.NLA_F_NESTED == nftaListElem {
			elems = append(elems, e.Value)
		}
	}
	return elems, true, nil
}

// parseRule reads the verdict of one NFT_MSG_NEWRULE payload (after the
// nfgenmsg header); ok is false for a rule of another table or chain.
func parseRule(b []byte, table, chain string) (rule Rule, ok bool, err error) {
	elems, ok, err := ruleElems(b, table, chain)
	if !ok || err != nil {
		return rule, ok, err
	}
	rule.Bare = true
	for _, e := range elems {
		name, data, err := exprNameData(e)
		if err != nil {
			return rule, false, err
		}
		switch name {
		case "counter":
		case "immediate":
			verdict, target, err := immediateVerdict(data)
			if err != nil {
				return rule, false, err
			}
			if verdict == "" {
				rule.Bare = false
			}
			rule.Verdict, rule.Target = verdict, target
		default:
			rule.Bare = false
		}
	}
	if rule.Verdict != "jump" {
		rule.Bare = false
	}
	return rule, true, nil
}

func exprNameData(b []byte) (name string, data []byte, err error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return "", nil, err
	}
	for _, a := range attrs {
		switch a.Attr.Type &^ unix.NLA_F_NESTED {
		case nftaExprName:
			name = cString(a.Value)
		case nftaExprData:
			data = a.Value
		}
	}
	return name, data, nil
}

// immediateVerdict returns "jump" or "goto" and the target chain when an
// immediate expression's data is such a verdict.
func immediateVerdict(b []byte) (verdict, target string, err error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return "", "", err
	}
	for _, a := range attrs {
		if a.Attr.Type&^unix.NLA_F_NESTED != nftaImmediateData {
			continue
		}
		code, chain, _, err := verdictOf(a.Value)
		switch {
		case err != nil:
			return "", "", err
		case code == nftJump:
			return "jump", chain, nil
		case code == nftGoto:
			return "goto", chain, nil
		}
		return "", "", nil
	}
	return "", "", nil
}

// verdictOf reads an NFTA_IMMEDIATE_DATA payload: its verdict code and the
// chain a jump or goto leads to. found is false when the data is a value,
// not a verdict.
func verdictOf(b []byte) (code int32, chain string, found bool, err error) {
	attrs, err := nl.ParseRouteAttr(b)
	if err != nil {
		return 0, "", false, err
	}
	for _, a := range attrs {
		if a.Attr.Type&^unix.NLA_F_NESTED != nftaDataVerdict {
			continue
		}
		v, err := nl.ParseRouteAttr(a.Value)
		if err != nil {
			return 0, "", false, err
		}
		for _, f := range v {
			switch f.Attr.Type &^ unix.NLA_F_NESTED {
			case nftaVerdictCode:
				if len(f.Value) == 4 {
					code = int32(binary.BigEndian.Uint32(f.Value))
				}
			case nftaVerdictChain:
				chain = cString(f.Value)
			}
		}
		return code, chain, true, nil
	}
	return 0, "", false, nil
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// nfnetlink is the nfnetlink header: family, version, resource id.
type nfnetlink struct{ family uint8 }

func (nfnetlink) Len() int { return 4 }
func (h nfnetlink) Serialize() []byte {
	return []byte{h.family, 0 /* NFNETLINK_V0 */, 0, 0}
}

// message is one nftables reply: its type within the subsystem and its
// attributes after the nfnetlink header.
type message struct {
	typ  uint16
	data []byte
}

// maxDumpRetries bounds how often a dump that the kernel marked as
// interrupted by a concurrent change is started again.
const maxDumpRetries = 5

// request sends one nftables request of type typ in network namespace
// ns and hands each reply to handle as it arrives: one for a get, all of
// them for a dump. A dump that a concurrent change interrupted is started
// again, after reset. An error the kernel returns is returned as the
// unix.Errno.
func request(ns netns.NsHandle, typ uint16, dump bool, family uint8, reset func(), handle func(message) error, attrs ...nl.NetlinkRequestData) error {
	for range maxDumpRetries {
		reset()
		interrupted, err := requestOnce(ns, typ, dump, family, handle, attrs)
		if err != nil || !interrupted {
			return err
		}
	}
	return errors.New("the ruleset kept changing during the dump")
}

func requestOnce(ns netns.NsHandle, typ uint16, dump bool, family uint8, handle func(message) error, attrs []nl.NetlinkRequestData) (interrupted bool, err error) {
	s, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_NETFILTER)
	if err != nil {
		return false, fmt.Errorf("opening nfnetlink socket: %w", err)
	}
	defer s.Close()
	if err := s.SetReceiveTimeout(&unix.Timeval{Sec: 5}); err != nil {
		return false, err
	}
	flags := unix.NLM_F_REQUEST
	if dump {
		flags |= unix.NLM_F_DUMP
	}
	req := nl.NewNetlinkRequest(nfnlSubsysNFTables<<8|int(typ), flags)
	req.AddData(nfnetlink{family: family})
	for _, a := range attrs {
		req.AddData(a)
	}
	if err := s.Send(req); err != nil {
		return false, err
	}
	for {
		batch, _, err := s.Receive()
		if err != nil {
			return false, err
		}
		for _, m := range batch {
			if m.Header.Seq != req.Seq {
				continue
			}
			if m.Header.Flags&unix.NLM_F_DUMP_INTR != 0 {
				interrupted = true
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return interrupted, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return false, errors.New("short netlink error message")
				}
				if errno := int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
					return false, unix.Errno(-errno)
				}
				return interrupted, nil
			}
			if m.Header.Type>>8 != nfnlSubsysNFTables || len(m.Data) < 4 {
				continue
			}
			if err := handle(message{typ: m.Header.Type & 0xff, data: m.Data[4:]}); err != nil {
				return false, err
			}
			if !dump {
				return false, nil
			}
		}
	}
}

// nftables netlink constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const (
	nfnlSubsysNFTables = 10
	nftMsgGetGen       = 16
	nftMsgNewGen       = 15
	nftaGenID          = 1
)

// Generation returns the nftables ruleset generation of c's network
// namespace. Every committed change to
// any nftables table, iptables-nft's included, increments it, so an
// unchanged generation means unchanged rules.
func (c Conn) Generation() (uint32, error) {
	var gen uint32
	found := false
	err := request(c.NS, nftMsgGetGen, false, unix.AF_UNSPEC, func() {}, func(m message) error {
		if m.typ != nftMsgNewGen {
			return nil
		}
		attrs, err := nl.ParseRouteAttr(m.data)
		if err != nil {
			return fmt.Errorf("parsing the nftables generation: %w", err)
		}
		for _, a := range attrs {
			if a.Attr.Type&^unix.NLA_F_NESTED == nftaGenID && len(a.Value) == 4 {
				gen, found = binary.BigEndian.Uint32(a.Value), true
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("reading the nftables generation: %w", err)
	}
	if !found {
		return 0, errors.New("reading the nftables generation: no generation id in the reply")
	}
	return gen, nil
}
