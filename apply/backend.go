package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/vishvananda/netns"
	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Detection is the backend Detect chose and why.
type Detection struct {
	Backend Backend
	// Evidence says what decided it, for the log.
	Evidence string
}

// DetectBackend runs Detect with the programs ex runs and this host's
// /proc. It only reads.
func DetectBackend(ctx context.Context, ex utilexec.Interface, f render.Family) (Detection, error) {
	return runner{node: hostNode{exec: ex, nft: nfnl.Conn{NS: netns.None()}}, timeout: defaultTimeout}.Detect(ctx, f)
}

// hintChains are the chains kubelet (and kube-proxy's canary) create in
// mangle to tell containers which backend the host uses.
var hintChains = []string{"KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"}

// builtinChains are the built-in chains of the tables agents hook into.
// Detect compares the number of rules in them when no hint chain exists.
// mangle comes first: a hint chain there settles it before more is read.
var builtinChains = []struct {
	table  string
	chains []string
}{
	{"mangle", []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}},
	{"raw", []string{"PREROUTING", "OUTPUT"}},
	{"nat", []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}},
	{"filter", []string{"INPUT", "FORWARD", "OUTPUT"}},
}

// Detect finds the backend the host's kube-proxy and kubelet use for family
// f, the way kubernetes-sigs/iptables-wrappers and Calico do:
//
//  1. a hint chain (KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY) in mangle,
//     looked for through nft first, then through legacy;
//  2. otherwise the backend with more rules in the built-in chains of raw,
//     mangle, nat and filter (every agent hooks in there; counting only
//     those keeps the nft probe to one cheap listing per chain, where a
//     whole-ruleset dump would cost a second on a large node);
//  3. otherwise nft.
//
// Legacy is probed only where /proc/net/ip_tables_names exists, and only
// the tables it lists are read: reading any other would create that legacy
// table, or load the legacy kernel modules.
func (r runner) Detect(ctx context.Context, f render.Family) (Detection, error) {
	nftErr := error(nil)
	for _, chain := range hintChains {
		found, err := r.nftHasChain(ctx, f, "mangle", chain)
		if err != nil {
			nftErr = err
			break
		}
		if found {
			return Detection{BackendNFT, fmt.Sprintf("chain %s in mangle, seen with nfnetlink", chain)}, nil
		}
	}

	tables, err := r.legacyTables(f)
	if err != nil {
		return Detection{}, err
	}
	note := ""
	if len(tables) > 0 && r.lookPath(BackendLegacy, f) != nil {
		note = fmt.Sprintf(" (legacy tables exist, but without %s they were not probed)", program(BackendLegacy, f, backend.Save))
		tables = nil
	}
	legacyRules := 0
	if tables != nil {
		save := program(BackendLegacy, f, backend.Save)
		hint := ""
		for _, t := range builtinChains {
			if !tables[t.table] {
				continue
			}
			builtin := map[string]bool{}
			for _, c := range t.chains {
				builtin[c] = true
			}
			err := r.run(ctx, nil, tableListing(t.table), func(line string) {
				if name, ok := strings.CutPrefix(line, ":"); ok && t.table == "mangle" && hint == "" {
					name, _, _ = strings.Cut(name, " ")
					for _, h := range hintChains {
						if name == h {
							hint = h
						}
					}
				}
				if rest, ok := strings.CutPrefix(line, "-A "); ok {
					if chain, _, _ := strings.Cut(rest, " "); builtin[chain] {
						legacyRules++
					}
				}
			}, save, "-t", t.table)
			if err != nil {
				return Detection{}, err
			}
			if hint != "" {
				return Detection{BackendLegacy, fmt.Sprintf("chain %s in mangle, seen with %s", hint, save)}, nil
			}
		}
	}
	if nftErr != nil {
		// Without a working nft probe there is nothing to weigh legacy against.
		return Detection{}, nftErr
	}
	if legacyRules == 0 {
		return Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default" + note}, nil
	}
	nftRules := 0
	for _, t := range builtinChains {
		for _, c := range t.chains {
			n, err := r.nftCountRules(ctx, f, t.table, c)
			if err != nil {
				return Detection{}, err
			}
			nftRules += n
		}
	}
	if legacyRules > nftRules {
		return Detection{BackendLegacy, fmt.Sprintf("no hint chain; %d legacy rules against %d nft rules in the built-in chains", legacyRules, nftRules)}, nil
	}
	return Detection{BackendNFT, fmt.Sprintf("no hint chain; %d nft rules against %d legacy rules in the built-in chains", nftRules, legacyRules)}, nil
}

// nftHasChain reports whether chain exists in table of the nft backend.
func (r runner) nftHasChain(_ context.Context, f render.Family, table, chain string) (bool, error) {
	return r.node.hasChain(f, table, chain)
}

// nftCountRules returns the number of rules in chain of table of the nft
// backend.
func (r runner) nftCountRules(_ context.Context, f render.Family, table, chain string) (int, error) {
	_, n, err := r.node.jumps(f, table, chain)
	return n, err
}

// legacyTables returns the legacy tables that exist for family f, as
// /proc/net/ip_tables_names (ip6_tables_names) lists them, or nil when the
// kernel has no legacy iptables loaded.
func (r runner) legacyTables(f render.Family) (map[string]bool, error) {
	name := "/proc/net/ip_tables_names"
	if f == render.IPv6 {
		name = "/proc/net/ip6_tables_names"
	}
	b, err := r.node.readFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the legacy tables: %w", err)
	}
	tables := map[string]bool{}
	for _, t := range strings.Fields(string(b)) {
		tables[t] = true
	}
	return tables, nil
}

func discard(string) {}
