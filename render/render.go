// Package render turns validated inputs into the sidecar's iptables ruleset.
//
// The ruleset comes from templates/ruleset.tmpl and nothing else: Render
// executes the template and then reads its output back into a Ruleset, so
// the payload printed by --dry-run and the chains and jumps the apply
// package compares with the kernel are one and the same text. The package is
// pure: no I/O besides the embedded templates, no logging.
package render

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"text/template"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/templates"
)

// Family is an IP address family.
type Family uint8

// The address families a ruleset is rendered for.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// FamilyOf returns the family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Ruleset is everything the sidecar installs for one address family.
type Ruleset struct {
	Family Family
	// Addrs are the addresses the rules are for, in the order rendered.
	Addrs []netip.Addr
	// Tables in the order they are loaded: raw, then filter.
	Tables []Table
	// payload is the template's output, the iptables-restore input for a
	// node where nothing of ours exists yet.
	payload []byte
}

// Table holds our chains in one iptables table.
type Table struct {
	Name   string
	Chains []Chain
}

// Chain is one of our own chains and the built-in chain that jumps to it.
type Chain struct {
	Name string
	// Hook is the built-in chain whose first rule jumps to this chain.
	Hook string
	// Rules are the chain's rules in order, each in the canonical form
	// `iptables -S` prints: "-A APISERVER-PROXY-INPUT -d 10.96.0.2/32 ...".
	Rules []string
}

// JumpSpec is the rule specification of the jump from Hook to the chain,
// without the "-A HOOK" or "-I HOOK" in front: "-j APISERVER-PROXY-INPUT".
func (c Chain) JumpSpec() string { return "-j " + c.Name }

// JumpRule is the jump as `iptables -S HOOK` lists it.
func (c Chain) JumpRule() string { return "-A " + c.Hook + " " + c.JumpSpec() }

// Payload returns the iptables-restore input that installs the whole
// ruleset on a node where none of it exists yet.
func (r *Ruleset) Payload() []byte { return r.payload }

// MaxAddresses is the most addresses one sidecar keeps: the proxy's own
// address per family and a few Service ClusterIPs it intercepts. Each adds
// five rules to every sync's comparison.
const MaxAddresses = 8

// Render renders one ruleset per address family, IPv4 first, holding the
// rules of each of that family's addresses in the order given. addrs must
// hold one to MaxAddresses distinct addresses.
func Render(addrs []netip.Addr, port uint16) ([]*Ruleset, error) {
	if len(addrs) == 0 || len(addrs) > MaxAddresses {
		return nil, fmt.Errorf("want 1 to %d addresses, got %d", MaxAddresses, len(addrs))
	}
	var byFamily [2][]netip.Addr
	for i, a := range addrs {
		if slices.Contains(addrs[:i], a) {
			return nil, fmt.Errorf("address %s given twice", a)
		}
		f := 0
		if FamilyOf(a) == IPv6 {
			f = 1
		}
		byFamily[f] = append(byFamily[f], a)
	}
	var out []*Ruleset
	for _, family := range byFamily {
		if len(family) == 0 {
			continue
		}
		rs, err := RenderFamily(family, port)
		if err != nil {
			return nil, err
		}
		out = append(out, rs)
	}
	return out, nil
}

// RenderFamily renders the ruleset for addresses of one family, in the
// order given.
func RenderFamily(addrs []netip.Addr, port uint16) (*Ruleset, error) {
	if len(addrs) == 0 {
		return nil, errors.New("no address")
	}
	if port == 0 {
		return nil, errors.New("port 0 cannot be rendered")
	}
	prefixes := make([]netip.Prefix, 0, len(addrs))
	for _, addr := range addrs {
		switch {
		case !addr.IsValid():
			return nil, errors.New("an invalid address")
		case addr.Zone() != "" || addr.Is4In6() || addr.IsUnspecified():
			return nil, fmt.Errorf("address %s cannot be rendered", addr)
		case FamilyOf(addr) != FamilyOf(addrs[0]):
			return nil, fmt.Errorf("addresses of two families in one ruleset: %s, %s", addrs[0], addr)
		}
		prefixes = append(prefixes, netip.PrefixFrom(addr, addr.BitLen()))
	}
	rs, err := execute(prefixes, port)
	if err != nil {
		return nil, err
	}
	rs.Family = FamilyOf(addrs[0])
	rs.Addrs = slices.Clone(addrs)
	return rs, nil
}

// Chains returns the ruleset of family f with our tables, chains and jumps
// but no rules: what a teardown needs to find and remove our chains in a
// family no address of which is configured (any more).
func Chains(f Family) (*Ruleset, error) {
	rs, err := execute(nil, 1)
	if err != nil {
		return nil, err
	}
	rs.Family = f
	return rs, nil
}

func execute(prefixes []netip.Prefix, port uint16) (*Ruleset, error) {
	data := struct {
		Prefixes []netip.Prefix
		Port     uint16
	}{prefixes, port}
	var buf bytes.Buffer
	if err := ruleset.Execute(&buf, data); err != nil {
		return nil, fmt.Errorf("execute %s: %w", templates.Ruleset, err)
	}
	rs, err := parse(buf.Bytes())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", templates.Ruleset, err)
	}
	return rs, nil
}

var ruleset = template.Must(template.New(templates.Ruleset).
	Option("missingkey=error").
	ParseFS(templates.FS, templates.Ruleset))

// parse reads the template's output back into a Ruleset. It accepts only
// the shape this package promises (tables with declared chains, "-A" rules
// into those chains, one "-I HOOK -j CHAIN" jump per chain, COMMIT), so a
// template edit that breaks the shape fails every render and every test.
func parse(payload []byte) (*Ruleset, error) {
	rs := &Ruleset{payload: payload}
	var t *Table
	chain := func(name string) *Chain {
		for i := range t.Chains {
			if t.Chains[i].Name == name {
				return &t.Chains[i]
			}
		}
		return nil
	}
	for n, line := range strings.Split(strings.TrimSuffix(string(payload), "\n"), "\n") {
		bad := func(why string) error { return fmt.Errorf("line %d %q: %s", n+1, line, why) }
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
			return nil, bad("empty line")
		case strings.HasPrefix(line, "*"):
			if t != nil {
				return nil, bad("table opened before COMMIT")
			}
			rs.Tables = append(rs.Tables, Table{Name: line[1:]})
			t = &rs.Tables[len(rs.Tables)-1]
		case t == nil:
			return nil, bad("outside a table")
		case line == "COMMIT":
			for _, c := range t.Chains {
				if c.Hook == "" {
					return nil, bad("chain " + c.Name + " has no jump")
				}
			}
			t = nil
		case strings.HasPrefix(line, ":"):
			if len(f) != 3 || f[1] != "-" || f[2] != "[0:0]" || !strings.HasPrefix(f[0], ":"+ChainPrefix) {
				return nil, bad("want \":" + ChainPrefix + "NAME - [0:0]\"")
			}
			if chain(f[0][1:]) != nil {
				return nil, bad("chain declared twice")
			}
			t.Chains = append(t.Chains, Chain{Name: f[0][1:]})
		case f[0] == "-A" && len(f) > 2:
			c := chain(f[1])
			if c == nil {
				return nil, bad("rule for an undeclared chain")
			}
			c.Rules = append(c.Rules, line)
		case f[0] == "-I" && len(f) == 4 && f[2] == "-j":
			c := chain(f[3])
			if c == nil || c.Hook != "" || strings.HasPrefix(f[1], ChainPrefix) {
				return nil, bad("want one jump from a built-in chain to each declared chain")
			}
			c.Hook = f[1]
		default:
			return nil, bad("unexpected line")
		}
	}
	if t != nil {
		return nil, errors.New("missing COMMIT at the end")
	}
	return rs, nil
}

// ChainPrefix starts the name of every chain the sidecar owns.
const ChainPrefix = "APISERVER-PROXY-"

// Format returns the text --dry-run prints for review: each family's
// payload after a comment line naming the family. iptables-restore skips
// comment lines, so each block can be loaded as it is.
func Format(rulesets []*Ruleset) []byte {
	var b bytes.Buffer
	for _, rs := range rulesets {
		fmt.Fprintf(&b, "# %s: %s --noflush\n", rs.Family, backend.Binary("", rs.Family == IPv6, backend.Restore))
		b.Write(rs.payload)
	}
	return b.Bytes()
}
