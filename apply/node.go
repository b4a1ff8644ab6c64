package apply

import (
	"context"
	"errors"
	"os"

	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/xtables"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// node is the host as Rules and Detect see it: the programs they run, the
// /proc files they read, and what the nft backend keeps in the kernel,
// read over nfnetlink. hostNode is the real one; the tests use a stateful
// fake.
type node interface {
	// LookPath finds a program in PATH, as utilexec.Interface does.
	LookPath(file string) (string, error)
	// CommandContext prepares a program, as utilexec.Interface does.
	CommandContext(ctx context.Context, name string, args ...string) utilexec.Cmd
	// readFile reads a /proc file.
	readFile(name string) ([]byte, error)
	nftReader
	// generation returns the nftables ruleset generation: every committed
	// change to any nftables table increments it.
	generation() (uint32, error)
	legacyReader
}

// nftReader reads what the nft backend keeps in the kernel, in-process over
// nfnetlink, where running `iptables-nft -S` would cost a process (about
// 3 ms) per chain: whether a chain exists, which rules of a chain jump to
// which chains, and the expressions of each rule, which readChainNFT
// compares with what iptables-nft stores for our rendered rules
// (wantExprs). What it does not recognise is listed with iptables-nft and
// compared as text.
type nftReader interface {
	// hasChain reports whether chain exists in table (false, nil when the
	// table does not exist either).
	hasChain(f render.Family, table, chain string) (bool, error)
	// jumps returns, in order, the rules of chain in table that end in a
	// jump or goto, and how many rules the chain has in all; none when the
	// table or chain does not exist.
	jumps(f render.Family, table, chain string) (jumps []nfnl.Rule, total int, err error)
	// exprs returns the expressions of each rule of chain in table, in
	// order and in the canonical form of nfnl.ExprText; none when the table
	// or chain does not exist.
	exprs(f render.Family, table, chain string) ([][]string, error)
}

// hostNode is a network namespace's node: programs run through exec, the
// nfnetlink reads go to nft's namespace.
type hostNode struct {
	exec utilexec.Interface
	nft  nfnl.Conn
	// proc reads /proc files; nil means os.ReadFile.
	proc func(name string) ([]byte, error)
	// xt reads the legacy backend's tables; nil: none is read in-process.
	xt *xtablesReader
}

func (h hostNode) LookPath(file string) (string, error) { return h.exec.LookPath(file) }

func (h hostNode) CommandContext(ctx context.Context, name string, args ...string) utilexec.Cmd {
	return h.exec.CommandContext(ctx, name, args...)
}

func (h hostNode) readFile(name string) ([]byte, error) {
	if h.proc != nil {
		return h.proc(name)
	}
	return os.ReadFile(name)
}

func (h hostNode) generation() (uint32, error) { return h.nft.Generation() }

// nfproto is the nftables family iptables-nft uses for f.
func nfproto(f render.Family) nfnl.Proto {
	if f == render.IPv6 {
		return nfnl.IPv6
	}
	return nfnl.IPv4
}

func (h hostNode) hasChain(f render.Family, table, chain string) (bool, error) {
	return h.nft.HasChain(nfproto(f), table, chain)
}

func (h hostNode) jumps(f render.Family, table, chain string) ([]nfnl.Rule, int, error) {
	return h.nft.Jumps(nfproto(f), table, chain)
}

func (h hostNode) exprs(f render.Family, table, chain string) ([][]string, error) {
	return h.nft.Exprs(nfproto(f), table, chain)
}

// errNoXtables: the node reads no legacy table in-process.
var errNoXtables = errors.New("no in-process reader of legacy tables")

func (h hostNode) legacyRead(f render.Family, table string, ours func(string) bool) (xtables.Table, error) {
	if h.xt == nil {
		return xtables.Table{}, errNoXtables
	}
	return h.xt.read(f, table, ours)
}

func (h hostNode) legacyInfo(f render.Family, table string) (xtables.TableInfo, error) {
	if h.xt == nil {
		return xtables.TableInfo{}, errNoXtables
	}
	return h.xt.info(f, table)
}
