package apply

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	utilexec "k8s.io/utils/exec"
	testingexec "k8s.io/utils/exec/testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
	"github.com/google/go-cmp/cmp"
)

// fakeNode is a stateful node: it keeps the tables and chains of each
// backend and family, runs the iptables programs the sidecar runs against
// them (-S, -save, --noflush restore), and answers the nfnetlink reads of
// the nft backend from the same rules. A restore payload is applied table
// by table, each COMMIT a transaction, and refused where iptables-restore
// would refuse it: a jump to a chain that does not exist, -D of a rule
// that is not there, a line for an unknown chain, -X of a chain in use; it
// also refuses a line for a built-in chain, which under --noflush would
// reset that chain's policy. A refused table is left as it was.
//
// It can be told to fail, hang or print garbage (fault), to lack a program
// (missing), and to make the nfnetlink or generation reads fail.
type fakeNode struct {
	t *testing.T

	mu     sync.Mutex
	tables map[nodeKey]map[string]*ipTable
	// legacyLoaded marks the families whose legacy iptables module is
	// loaded: /proc/net/ip{,6}_tables_names exists for them.
	legacyLoaded map[render.Family]bool
	gen          uint32
	ran          []string
	// payloads holds the stdin of every restore run, in order.
	payloads []string
	// nfnlReads counts the nfnetlink reads.
	nfnlReads int

	// missing names the programs not in PATH.
	missing map[string]bool
	// faults replace a program's behaviour, by program name.
	faults map[string]fault
	// nfnlErr fails every nfnetlink read; genErr the generation read.
	nfnlErr, genErr error
	// unknownExprs makes the nfnetlink reads give the rules of our chains
	// in a form wantExprs does not know, as another iptables release
	// might store them.
	unknownExprs bool
	// legacyInProcess answers the in-process legacy reads from the rules;
	// without it they fail, and every legacy read is a -save.
	legacyInProcess bool
	// legacyReads counts the in-process legacy reads.
	legacyReads int
}

// fault is what a program does instead of its job: print stdout and
// stderr and exit with exit, or hang until it is killed.
type fault struct {
	exit           int
	stdout, stderr string
	hang           bool
}

type nodeKey struct {
	backend Backend
	family  render.Family
}

type ipTable struct {
	name   string
	chains map[string]*ipChain
}

type ipChain struct {
	builtin bool
	policy  string
	rules   []string // as `iptables -S` lists them: "-A CHAIN SPEC"
}

// builtins are the built-in chains of each table.
var builtins = map[string][]string{
	"raw":    {"PREROUTING", "OUTPUT"},
	"mangle": {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	"nat":    {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"filter": {"INPUT", "FORWARD", "OUTPUT"},
}

// targets are the targets that are not chains.
var targets = map[string]bool{"ACCEPT": true, "DROP": true, "RETURN": true, "NOTRACK": true, "CT": true, "REJECT": true, "MARK": true, "LOG": true, "DNAT": true, "SNAT": true, "MASQUERADE": true}

func newFakeNode(t *testing.T) *fakeNode {
	return &fakeNode{
		t:            t,
		tables:       map[nodeKey]map[string]*ipTable{},
		legacyLoaded: map[render.Family]bool{},
		missing:      map[string]bool{},
		faults:       map[string]fault{},
	}
}

// rules returns Rules for rs on n, with their observations counted.
func (n *fakeNode) rules(b Backend, rs *render.Ruleset) (*Rules, *Counts) {
	stats := &Counts{}
	return rulesOn(n, b, rs, stats), stats
}

// table returns table name of backend b and family f, created with its
// built-in chains if need be.
func (n *fakeNode) table(b Backend, f render.Family, name string) *ipTable {
	k := nodeKey{b, f}
	if n.tables[k] == nil {
		n.tables[k] = map[string]*ipTable{}
	}
	t := n.tables[k][name]
	if t == nil {
		t = newIPTable(name)
		n.tables[k][name] = t
		if b == BackendLegacy {
			n.legacyLoaded[f] = true
		}
	}
	return t
}

func newIPTable(name string) *ipTable {
	t := &ipTable{name: name, chains: map[string]*ipChain{}}
	for _, c := range builtins[name] {
		t.chains[c] = &ipChain{builtin: true, policy: "ACCEPT"}
	}
	return t
}

// set puts lines, as `iptables -S` prints them ("-P CHAIN POLICY", "-N
// CHAIN", "-A CHAIN SPEC"), into table of backend b and family f, without
// any check: the state a test starts from.
func (n *fakeNode) set(b Backend, f render.Family, table string, lines ...string) *fakeNode {
	n.mu.Lock()
	defer n.mu.Unlock()
	t := n.table(b, f, table)
	for _, line := range lines {
		w := strings.Fields(line)
		switch w[0] {
		case "-P":
			t.chains[w[1]].policy = w[2]
		case "-N":
			t.chains[w[1]] = &ipChain{}
		case "-A":
			c := t.chains[w[1]]
			if c == nil {
				c = &ipChain{}
				t.chains[w[1]] = c
			}
			c.rules = append(c.rules, line)
		default:
			n.t.Fatalf("fakeNode.set: cannot set %q", line)
		}
	}
	if b == BackendNFT {
		n.gen++
	}
	return n
}

// converged puts rs in place in backend b, as a sync would.
func (n *fakeNode) converged(b Backend, rs *render.Ruleset) *fakeNode {
	for _, t := range rs.Tables {
		var lines []string
		for _, c := range t.Chains {
			lines = append(lines, "-N "+c.Name)
			lines = append(lines, c.Rules...)
		}
		for _, c := range t.Chains {
			lines = append(lines, c.JumpRule())
		}
		n.set(b, rs.Family, t.Name, lines...)
	}
	return n
}

// clear removes every table of backend b and family f, as a reboot would.
func (n *fakeNode) clear(b Backend, f render.Family) *fakeNode {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.tables, nodeKey{b, f})
	if b == BackendNFT {
		n.gen++
	}
	return n
}

// touch stands for a write of another agent: the generation moves.
func (n *fakeNode) touch() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.gen++
}

// loadLegacy marks the legacy module of f loaded: its tables file exists,
// even while it lists no table.
func (n *fakeNode) loadLegacy(f render.Family) *fakeNode {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.legacyLoaded[f] = true
	return n
}

// Dump returns every chain and rule of the node, one per line, as
// "BACKEND FAMILY TABLE LINE" with LINE as `iptables -S` prints it: chains
// sorted by table and name, built-in chains with their policy, rules in
// their order.
func (n *fakeNode) Dump() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	keys := make([]nodeKey, 0, len(n.tables))
	for k := range n.tables {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b nodeKey) int {
		return strings.Compare(fmt.Sprint(a.backend, a.family), fmt.Sprint(b.backend, b.family))
	})
	for _, k := range keys {
		names := make([]string, 0, len(n.tables[k]))
		for name := range n.tables[k] {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			t := n.tables[k][name]
			prefix := fmt.Sprintf("%s %s %s ", k.backend, k.family, name)
			for _, c := range t.sortedChains() {
				for _, line := range t.listing(c) {
					out = append(out, prefix+line)
				}
			}
		}
	}
	return out
}

// ours is the part of Dump that is rs's: its chains and their rules, and
// the rules of built-in chains that target them.
func (n *fakeNode) ours(rs *render.Ruleset) []string {
	var out []string
	for _, line := range n.Dump() {
		if isOurs(rs, line) {
			out = append(out, line)
		}
	}
	return out
}

// isOurs reports whether a Dump line ("nft IPv4 raw -A CHAIN ...") is
// one of ours(rs).
func isOurs(rs *render.Ruleset, line string) bool {
	f := strings.Fields(line)
	ours := func(chain string) bool {
		for _, t := range rs.Tables {
			for _, c := range t.Chains {
				if t.Name == f[2] && c.Name == chain {
					return true
				}
			}
		}
		return false
	}
	return ours(f[4]) || f[3] == "-A" && slices.Contains(builtins[f[2]], f[4]) && ours(target(strings.Join(f[3:], " ")))
}

// sortedChains returns the chains of t: built-in ones first, in the
// kernel's order, then the others by name.
func (t *ipTable) sortedChains() []string {
	var bi, user []string
	for name, c := range t.chains {
		if c.builtin {
			bi = append(bi, name)
		} else {
			user = append(user, name)
		}
	}
	order := func(s string) int { return slices.Index(builtins[t.name], s) }
	slices.SortFunc(bi, func(a, b string) int { return order(a) - order(b) })
	slices.Sort(user)
	return append(bi, user...)
}

// listing is what `iptables -t TABLE -S chain` prints.
func (t *ipTable) listing(chain string) []string {
	c := t.chains[chain]
	head := "-N " + chain
	if c.builtin {
		head = "-P " + chain + " " + c.policy
	}
	return append([]string{head}, c.rules...)
}

// save is what `iptables-save -t TABLE` prints.
func (t *ipTable) save(name string) string {
	var b strings.Builder
	b.WriteString("# Generated by iptables-save v1.8.9\n*" + name + "\n")
	order := t.sortedChains()
	for _, c := range order {
		if t.chains[c].builtin {
			fmt.Fprintf(&b, ":%s %s [0:0]\n", c, t.chains[c].policy)
		} else {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c)
		}
	}
	for _, c := range order {
		for _, r := range t.chains[c].rules {
			b.WriteString(r + "\n")
		}
	}
	b.WriteString("COMMIT\n# Completed\n")
	return b.String()
}

func (t *ipTable) clone() *ipTable {
	c := &ipTable{name: t.name, chains: map[string]*ipChain{}}
	for name, ch := range t.chains {
		cp := *ch
		cp.rules = slices.Clone(ch.rules)
		c.chains[name] = &cp
	}
	return c
}

// takeRan returns and forgets the programs run so far, each as its argv
// joined by spaces.
func (n *fakeNode) takeRan() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	ran := n.ran
	n.ran = nil
	return ran
}

// LookPath implements node.
func (n *fakeNode) LookPath(file string) (string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.missing[file] {
		return "", &testingexec.FakeExitError{Status: 127}
	}
	return "/usr/sbin/" + file, nil
}

// CommandContext implements node.
func (n *fakeNode) CommandContext(ctx context.Context, name string, args ...string) utilexec.Cmd {
	return &fakeCmd{n: n, ctx: ctx, argv: append([]string{name}, args...)}
}

// readFile implements node: the legacy tables files.
func (n *fakeNode) readFile(name string) ([]byte, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	f := map[string]render.Family{"/proc/net/ip_tables_names": render.IPv4, "/proc/net/ip6_tables_names": render.IPv6}
	fam, ok := f[name]
	if !ok || !n.legacyLoaded[fam] {
		return nil, fs.ErrNotExist
	}
	var names []string
	for t := range n.tables[nodeKey{BackendLegacy, fam}] {
		names = append(names, t)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, t := range names {
		b.WriteString(t + "\n")
	}
	return []byte(b.String()), nil
}

// generation implements node.
func (n *fakeNode) generation() (uint32, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.gen, n.genErr
}

func (n *fakeNode) nftTable(f render.Family, table string) *ipTable {
	return n.tables[nodeKey{BackendNFT, f}][table]
}

// hasChain implements nftReader.
func (n *fakeNode) hasChain(f render.Family, table, chain string) (bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.nfnlReads++
	if n.nfnlErr != nil {
		return false, n.nfnlErr
	}
	t := n.nftTable(f, table)
	return t != nil && t.chains[chain] != nil, nil
}

// jumps implements nftReader: a rule whose target is a chain is a jump
// (-j) or goto (-g), bare when it is nothing but "-A CHAIN -j TARGET".
func (n *fakeNode) jumps(f render.Family, table, chain string) ([]nfnl.Rule, int, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.nfnlReads++
	if n.nfnlErr != nil {
		return nil, 0, n.nfnlErr
	}
	t := n.nftTable(f, table)
	if t == nil || t.chains[chain] == nil {
		return nil, 0, nil
	}
	var out []nfnl.Rule
	rules := t.chains[chain].rules
	for _, rule := range rules {
		w := strings.Fields(rule)
		for i := len(w) - 2; i >= 0; i-- {
			if w[i] != "-j" && w[i] != "-g" {
				continue
			}
			if !targets[w[i+1]] {
				v := map[string]string{"-j": "jump", "-g": "goto"}[w[i]]
				out = append(out, nfnl.Rule{Verdict: v, Target: w[i+1], Bare: len(w) == 4 && v == "jump"})
			}
			break
		}
	}
	return out, len(rules), nil
}

// exprs implements nftReader: each rule as iptables-nft stores it, which
// for a rule of ours is what wantExprs says (proven against the kernel in
// nftables_netns_test.go); any other rule reads as something no rendered
// rule is.
func (n *fakeNode) exprs(f render.Family, table, chain string) ([][]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.nfnlReads++
	if n.nfnlErr != nil {
		return nil, n.nfnlErr
	}
	t := n.nftTable(f, table)
	if t == nil || t.chains[chain] == nil {
		return nil, nil
	}
	var out [][]string
	for _, rule := range t.chains[chain].rules {
		e, ok := wantExprs(f, rule)
		if !ok || n.unknownExprs {
			e = []string{"unknown " + rule}
		}
		out = append(out, e)
	}
	return out, nil
}

// program0 identifies argv[0]: its backend, family and tool.
func program0(name string) (Backend, render.Family, backend.Tool, bool) {
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		for _, f := range []render.Family{render.IPv4, render.IPv6} {
			for _, t := range []backend.Tool{backend.IPTables, backend.Save, backend.Restore} {
				if program(b, f, t) == name {
					return b, f, t, true
				}
			}
		}
	}
	return "", 0, "", false
}

// exec runs argv against the node and returns its stdout, stderr and exit
// status.
func (n *fakeNode) exec(ctx context.Context, argv []string, stdin []byte) (string, string, int) {
	n.mu.Lock()
	n.ran = append(n.ran, strings.Join(argv, " "))
	if stdin != nil {
		n.payloads = append(n.payloads, string(stdin))
	}
	f, faulty := n.faults[argv[0]]
	n.mu.Unlock()
	if faulty {
		if f.hang {
			<-ctx.Done()
			return "", "", -1
		}
		return f.stdout, f.stderr, f.exit
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	b, fam, tool, ok := program0(argv[0])
	if !ok {
		return "", argv[0] + ": not a program of the fake node\n", 127
	}
	args := argv[1:]
	switch {
	case tool == backend.IPTables && len(args) == 4 && args[0] == "-t" && args[2] == "-S":
		return n.list(b, fam, args[1], args[3])
	case tool == backend.Save && len(args) == 2 && args[0] == "-t":
		// Reading a legacy table creates it, as the kernel does.
		return n.table(b, fam, args[1]).save(args[1]), "", 0
	case tool == backend.Restore && len(args) == 2 && args[0] == "--noflush" && strings.HasPrefix(args[1], "--wait="):
		return n.restore(b, fam, string(stdin))
	}
	return "", fmt.Sprintf("fake node: unexpected arguments %q\n", args), 2
}

func (n *fakeNode) list(b Backend, f render.Family, table, chain string) (string, string, int) {
	t := n.tables[nodeKey{b, f}][table]
	if t == nil && b == BackendNFT && slices.Contains(builtins[table], chain) {
		// iptables-nft lists a built-in chain of a table not yet created
		// as empty.
		t = newIPTable(table)
	}
	if t == nil || t.chains[chain] == nil {
		if b == BackendNFT {
			return "", fmt.Sprintf("iptables v1.8.9 (nf_tables): chain `%s' in table `%s' is incompatible, use 'nft' tool.\n", chain, table), 1
		}
		return "", "iptables: No chain/target/match by that name.\n", 1
	}
	return strings.Join(t.listing(chain), "\n") + "\n", "", 0
}

// restore applies payload as iptables-restore --noflush does: each table up
// to its COMMIT at once; at the first refused line it stops, leaving the
// table it was in as it was.
func (n *fakeNode) restore(b Backend, f render.Family, payload string) (string, string, int) {
	var (
		name string
		work *ipTable
	)
	refuse := func(i int, line, why string) (string, string, int) {
		return "", fmt.Sprintf("iptables-restore: line %d failed: %s: %s\n", i+1, line, why), 1
	}
	for i, line := range strings.Split(strings.TrimSuffix(payload, "\n"), "\n") {
		w := strings.Fields(line)
		switch {
		case len(w) == 0 || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			if work != nil {
				return refuse(i, line, "table opened before COMMIT")
			}
			name = line[1:]
			if builtins[name] == nil {
				return refuse(i, line, "unknown table")
			}
			if t := n.tables[nodeKey{b, f}][name]; t != nil {
				work = t.clone()
			} else {
				work = newIPTable(name)
			}
		case work == nil:
			return refuse(i, line, "outside a table")
		case line == "COMMIT":
			n.table(b, f, name)
			n.tables[nodeKey{b, f}][name] = work
			if b == BackendNFT {
				n.gen++
			}
			work = nil
		case strings.HasPrefix(line, ":"):
			chain := w[0][1:]
			if c := work.chains[chain]; c != nil && c.builtin {
				return refuse(i, line, "a line for a built-in chain resets its policy")
			}
			if len(w) != 3 || w[1] != "-" {
				return refuse(i, line, "bad chain line")
			}
			work.chains[chain] = &ipChain{}
		case len(w) >= 2 && (w[0] == "-A" || w[0] == "-I" || w[0] == "-D"):
			c := work.chains[w[1]]
			if c == nil {
				return refuse(i, line, "unknown chain "+w[1])
			}
			rule := "-A " + strings.TrimSpace(strings.TrimPrefix(line, w[0]))
			if tg := target(rule); tg != "" && !targets[tg] && work.chains[tg] == nil {
				return refuse(i, line, "jump to a missing chain "+tg)
			}
			switch w[0] {
			case "-A":
				c.rules = append(c.rules, rule)
			case "-I":
				c.rules = append([]string{rule}, c.rules...)
			case "-D":
				j := slices.Index(c.rules, rule)
				if j < 0 {
					return refuse(i, line, "no such rule")
				}
				c.rules = slices.Delete(c.rules, j, j+1)
			}
		case len(w) == 2 && w[0] == "-X":
			c := work.chains[w[1]]
			switch {
			case c == nil:
				return refuse(i, line, "unknown chain "+w[1])
			case c.builtin:
				return refuse(i, line, "a built-in chain")
			case len(c.rules) > 0:
				return refuse(i, line, "chain not empty")
			}
			for _, other := range work.chains {
				for _, r := range other.rules {
					if target(r) == w[1] {
						return refuse(i, line, "chain in use")
					}
				}
			}
			delete(work.chains, w[1])
		default:
			return refuse(i, line, "unknown line")
		}
	}
	if work != nil {
		return "", "iptables-restore: COMMIT expected at the end\n", 1
	}
	return "", "", 0
}

// fakeCmd is one program run on a fakeNode.
type fakeCmd struct {
	n              *fakeNode
	ctx            context.Context
	argv           []string
	stdin          io.Reader
	stdout, stderr io.Writer
}

func (c *fakeCmd) Run() error {
	var in []byte
	if c.stdin != nil {
		var err error
		if in, err = io.ReadAll(c.stdin); err != nil {
			return err
		}
	}
	out, errOut, exit := c.n.exec(c.ctx, c.argv, in)
	if c.stdout != nil {
		io.WriteString(c.stdout, out)
	}
	if c.stderr != nil {
		io.WriteString(c.stderr, errOut)
	}
	switch {
	case exit == -1:
		return c.ctx.Err()
	case exit != 0:
		return testingexec.FakeExitError{Status: exit}
	}
	return nil
}

func (c *fakeCmd) CombinedOutput() ([]byte, error) {
	var b bytes.Buffer
	c.stdout, c.stderr = &b, &b
	err := c.Run()
	return b.Bytes(), err
}

func (c *fakeCmd) Output() ([]byte, error) {
	var b bytes.Buffer
	c.stdout = &b
	err := c.Run()
	return b.Bytes(), err
}

func (c *fakeCmd) SetDir(string)                      {}
func (c *fakeCmd) SetStdin(in io.Reader)              { c.stdin = in }
func (c *fakeCmd) SetStdout(out io.Writer)            { c.stdout = out }
func (c *fakeCmd) SetStderr(out io.Writer)            { c.stderr = out }
func (c *fakeCmd) SetEnv([]string)                    {}
func (c *fakeCmd) StdoutPipe() (io.ReadCloser, error) { return nil, fmt.Errorf("fakeCmd: no pipes") }
func (c *fakeCmd) StderrPipe() (io.ReadCloser, error) { return nil, fmt.Errorf("fakeCmd: no pipes") }
func (c *fakeCmd) Start() error                       { return fmt.Errorf("fakeCmd: use Run") }
func (c *fakeCmd) Wait() error                        { return fmt.Errorf("fakeCmd: use Run") }
func (c *fakeCmd) Stop()                              {}

// The fake refuses what iptables-restore refuses, and a refused table is
// left as it was while the tables committed before it stay.
func TestFakeNodeRestore(t *testing.T) {
	for _, tc := range []struct {
		name, payload, why string
	}{
		{"jump to a missing chain", "*filter\n-A INPUT -j NOWHERE\nCOMMIT\n", "jump to a missing chain NOWHERE"},
		{"delete of a rule that is not there", "*filter\n-D INPUT -j ACCEPT\nCOMMIT\n", "no such rule"},
		{"line for an unknown chain", "*filter\n-A NOWHERE -j ACCEPT\nCOMMIT\n", "unknown chain NOWHERE"},
		{"built-in chain policy line", "*filter\n:INPUT DROP [0:0]\nCOMMIT\n", "resets its policy"},
		{"chain in use", "*filter\n:OURS - [0:0]\n-X OURS\nCOMMIT\n", "chain in use"},
		{"no COMMIT", "*filter\n-A INPUT -j ACCEPT\n", "COMMIT expected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(t)
			n.set(BackendNFT, render.IPv4, "filter", "-N OURS", "-A INPUT -j OURS")
			before := n.Dump()
			payload := "*raw\n:APISERVER-PROXY-X - [0:0]\nCOMMIT\n" + strings.Replace(tc.payload, "COMMIT\n", "-A INPUT -j DROP\nCOMMIT\n", 1)
			cmd := n.CommandContext(context.Background(), "iptables-nft-restore", "--noflush", "--wait=5")
			cmd.SetStdin(strings.NewReader(payload))
			out, err := cmd.CombinedOutput()
			if err == nil || !strings.Contains(string(out), tc.why) {
				t.Fatalf("restore: %v, %q; want a refusal saying %q", err, out, tc.why)
			}
			var filter []string
			for _, line := range n.Dump() {
				if !strings.HasPrefix(line, "nft IPv4 raw ") {
					filter = append(filter, line)
				}
			}
			if diff := cmp.Diff(before, filter); diff != "" {
				t.Errorf("the refused table changed (-before +after):\n%s", diff)
			}
			if !slices.Contains(n.Dump(), "nft IPv4 raw -N APISERVER-PROXY-X") {
				t.Errorf("the table committed before the refusal is gone: %q", n.Dump())
			}
		})
	}
}

// The fake lists what it holds as iptables does.
func TestFakeNodeListings(t *testing.T) {
	n := newFakeNode(t)
	n.set(BackendLegacy, render.IPv4, "filter", "-P INPUT DROP", "-N OURS", "-A INPUT -j OURS", "-A OURS -j ACCEPT")
	run := func(name string, args ...string) string {
		out, err := n.CommandContext(context.Background(), name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %q: %v: %s", name, args, err, out)
		}
		return string(out)
	}
	if got, want := run("iptables-legacy", "-t", "filter", "-S", "INPUT"), "-P INPUT DROP\n-A INPUT -j OURS\n"; got != want {
		t.Errorf("-S INPUT = %q, want %q", got, want)
	}
	want := "# Generated by iptables-save v1.8.9\n*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:OURS - [0:0]\n-A INPUT -j OURS\n-A OURS -j ACCEPT\nCOMMIT\n# Completed\n"
	if got := run("iptables-legacy-save", "-t", "filter"); got != want {
		t.Errorf("-save = %q, want %q", got, want)
	}
	if b, _ := n.readFile("/proc/net/ip_tables_names"); string(b) != "filter\n" {
		t.Errorf("ip_tables_names = %q", b)
	}
	if _, err := n.readFile("/proc/net/ip6_tables_names"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ip6_tables_names without legacy IPv6: %v, want not found", err)
	}
	n.set(BackendNFT, render.IPv4, "filter", "-N OURS", "-A INPUT -j OURS", "-A INPUT -i eth0 -j OURS", "-A INPUT -g OURS", "-A INPUT -j ACCEPT")
	jumps, total, _ := n.jumps(render.IPv4, "filter", "INPUT")
	wantJumps := []nfnl.Rule{{Verdict: "jump", Target: "OURS", Bare: true}, {Verdict: "jump", Target: "OURS"}, {Verdict: "goto", Target: "OURS"}}
	if diff := cmp.Diff(wantJumps, jumps); diff != "" || total != 4 {
		t.Errorf("jumps (total %d, want 4) (-want +got):\n%s", total, diff)
	}
}

// legacyRead implements node: what the legacy table holds of the chains
// ours accepts, as xtables.Walk tells it.
func (n *fakeNode) legacyRead(f render.Family, table string, ours func(string) bool) (xtables.Table, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.legacyInProcess {
		return xtables.Table{}, errNoXtables
	}
	n.legacyReads++
	out := xtables.Table{Chains: map[string][]string{}, Jumps: map[string][]string{}}
	t := n.tables[nodeKey{BackendLegacy, f}][table]
	if t == nil {
		return out, nil
	}
	for name, c := range t.chains {
		switch {
		case ours(name):
			out.Chains[name] = slices.Clone(c.rules)
		case c.builtin:
			for _, r := range c.rules {
				if ours(target(r)) {
					out.Jumps[name] = append(out.Jumps[name], r)
				}
			}
		}
	}
	return out, nil
}

// legacyInfo implements node: a fingerprint of the legacy table that
// changes with any of its rules.
func (n *fakeNode) legacyInfo(f render.Family, table string) (xtables.TableInfo, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.legacyInProcess {
		return xtables.TableInfo{}, errNoXtables
	}
	t := n.tables[nodeKey{BackendLegacy, f}][table]
	if t == nil {
		return xtables.TableInfo{}, nil
	}
	names := slices.Sorted(maps.Keys(t.chains))
	h := crc32.NewIEEE()
	entries := 0
	for _, name := range names {
		c := t.chains[name]
		fmt.Fprintf(h, "%s %s\n", name, c.policy)
		for _, r := range c.rules {
			fmt.Fprintln(h, r)
			entries++
		}
	}
	return xtables.TableInfo{NumEntries: uint32(entries + len(names)), Size: h.Sum32()}, nil
}
