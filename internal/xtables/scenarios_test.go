package xtables

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// builtins lists each table's built-in chains.
var builtins = map[string][]string{
	"raw":    {"PREROUTING", "OUTPUT"},
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}

// tables is restore input per table: declarations of user chains first,
// then rules.
type tables map[string]*tableText

type tableText struct {
	policy string // of the built-in chains; "" is ACCEPT
	decls  []string
	rules  []string
}

func (ts tables) table(name string) *tableText {
	if ts[name] == nil {
		ts[name] = &tableText{}
	}
	return ts[name]
}

func (ts tables) chain(table, name string) {
	ts.table(table).decls = append(ts.table(table).decls, ":"+name+" - [0:0]")
}

func (ts tables) rule(table, line string) {
	ts.table(table).rules = append(ts.table(table).rules, line)
}

// text is the whole restore input, tables in a fixed order.
func (ts tables) text() string {
	var b strings.Builder
	for _, name := range []string{"raw", "filter", "nat"} {
		t := ts[name]
		if t == nil {
			continue
		}
		policy := t.policy
		if policy == "" {
			policy = "ACCEPT"
		}
		fmt.Fprintf(&b, "*%s\n", name)
		for _, c := range builtins[name] {
			fmt.Fprintf(&b, ":%s %s [0:0]\n", c, policy)
		}
		for _, l := range append(append([]string{}, t.decls...), t.rules...) {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// addOurs adds the rendered ruleset for addrs, with its jumps first in
// their built-in chains.
func (ts tables) addOurs(t testing.TB, addrs ...string) *render.Ruleset {
	t.Helper()
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, netip.MustParseAddr(a))
	}
	rs, err := render.RenderFamily(as, 443)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range rs.Tables {
		for _, c := range tb.Chains {
			ts.chain(tb.Name, c.Name)
			ts.rule(tb.Name, c.JumpRule())
		}
		for _, c := range tb.Chains {
			for _, r := range c.Rules {
				ts.rule(tb.Name, r)
			}
		}
	}
	return rs
}

// foreignRules are what kube-proxy, Calico and firewalld write, in a
// family's notation: every match and target the walk must step over.
func foreignRules(t testing.TB, ns *netnstest.NS, f Family) tables {
	t.Helper()
	net, host, dnat := "10.0.0.0/8", "10.1.2.3/32", "10.0.0.1:6443"
	if f == IPv6 {
		net, host, dnat = "fd00:1::/64", "fd00:1::3/128", "[fd00:1::1]:6443"
	}
	ts := tables{}
	for _, c := range []string{"KUBE-SERVICES", "KUBE-FIREWALL", "cali-INPUT", "IN_public"} {
		ts.chain("filter", c)
	}
	for _, r := range []string{
		`-A INPUT -m comment --comment "kubernetes service portals" -m conntrack --ctstate NEW -j KUBE-SERVICES`,
		`-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`,
		`-A INPUT -m mark --mark 0x8000/0x8000 -j DROP`,
		`-A INPUT -p tcp -m multiport --dports 80,443 -j ACCEPT`,
		`-A INPUT -m statistic --mode random --probability 0.50000000000 -j cali-INPUT`,
		`-A INPUT -m addrtype --dst-type LOCAL -j KUBE-FIREWALL`,
		`-A INPUT -i eth0 -s ` + net + ` -p udp -m udp --dport 53 -j ACCEPT`,
		`-A INPUT ! -d ` + host + ` -p tcp -m tcp --dport 10250 -j IN_public`,
		`-A INPUT -p tcp -m tcp --dport 22 -j LOG --log-prefix "ssh: "`,
		`-A INPUT -p tcp -j REJECT --reject-with tcp-reset`,
		`-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP`,
		`-A cali-INPUT -m mark --mark 0x10000/0x10000 -j ACCEPT`,
		`-A cali-INPUT -j MARK --set-xmark 0x0/0xf0000`,
		`-A IN_public -d ` + host + ` -p tcp -m tcp --dport 443 -j ACCEPT`,
		`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
		`-A FORWARD -j KUBE-FIREWALL`,
	} {
		ts.rule("filter", r)
	}
	if _, err := exec.LookPath("ipset"); err == nil {
		family := "inet"
		if f == IPv6 {
			family = "inet6"
		}
		set := "apsc-test-" + strings.ToLower(f.String())
		ns.Run(t, "ipset", "create", set, "hash:ip", "family", family)
		ts.rule("filter", "-A KUBE-FIREWALL -m set --match-set "+set+" src -j DROP")
	} else {
		t.Logf("leaving out a -m set rule: ipset is not installed, so no set can be created for it to name")
	}
	ts.chain("nat", "KUBE-SVC-X")
	for _, r := range []string{
		`-A PREROUTING -d ` + host + ` -p tcp -m tcp --dport 443 -j KUBE-SVC-X`,
		`-A KUBE-SVC-X -p tcp -j DNAT --to-destination ` + dnat,
		`-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE`,
	} {
		ts.rule("nat", r)
	}
	ts.rule("raw", `-A PREROUTING -p udp -m udp --dport 4789 -j NOTRACK`)
	ts.rule("raw", `-A OUTPUT -j CT --notrack`)
	return ts
}

// manyRules adds n foreign rules to table's INPUT or PREROUTING chain
// (and a foreign chain), each distinct.
func (ts tables) manyRules(f Family, table string, n int) {
	hook := builtins[table][0]
	ts.chain(table, "FOREIGN-MANY")
	for i := range n {
		var addr string
		if f == IPv6 {
			addr = fmt.Sprintf("fd00:2::%x:%x/128", i>>16, i&0xffff)
		} else {
			addr = fmt.Sprintf("10.%d.%d.%d/32", 100+i>>16, i>>8&0xff, i&0xff)
		}
		chain := hook
		if i%2 == 1 {
			chain = "FOREIGN-MANY"
		}
		ts.rule(table, fmt.Sprintf("-A %s -s %s -p tcp -m tcp --dport %d -m comment --comment \"rule %d\" -j ACCEPT", chain, addr, 1+i%60000, i))
	}
}

// addrs are our addresses in the scenarios.
func addrs(f Family) []string {
	if f == IPv6 {
		return []string{"fd00::2", "fd00:10:96::1"}
	}
	return []string{"10.96.0.2", "100.64.0.1"}
}
