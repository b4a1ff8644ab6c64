package apply

import (
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

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

// nftables is the nftReader of a network namespace.
type nftables struct{ conn nfnl.Conn }

// nfproto is the nftables family iptables-nft uses for f.
func nfproto(f render.Family) nfnl.Proto {
	if f == render.IPv6 {
		return nfnl.IPv6
	}
	return nfnl.IPv4
}

func (n nftables) hasChain(f render.Family, table, chain string) (bool, error) {
	return n.conn.HasChain(nfproto(f), table, chain)
}

func (n nftables) jumps(f render.Family, table, chain string) ([]nfnl.Rule, int, error) {
	return n.conn.Jumps(nfproto(f), table, chain)
}

func (n nftables) exprs(f render.Family, table, chain string) ([][]string, error) {
	return n.conn.Exprs(nfproto(f), table, chain)
}
