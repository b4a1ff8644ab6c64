package apply

import (
	"context"
	"strings"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// oursInBackend counts the lines of ours that backend b's save lists for
// the ruleset's family.
func oursInBackend(t *testing.T, ns *netnstest.NS, b Backend, rs *render.Ruleset) int {
	t.Helper()
	return strings.Count(ns.Run(t, program(b, rs.Family, backend.Save)), render.ChainPrefix)
}

// TestBackendNetns runs Rules with each backend setting in namespaces set up
// as different hosts leave them, and checks where our rules end up.
func TestBackendNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	for _, tc := range []struct {
		name  string
		setup [][]string // commands run in the namespace first; IPT is the family's iptables
		flag  Backend
		want  Backend
	}{
		{"hint chain in nft", [][]string{{"IPT-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}}, BackendAuto, BackendNFT},
		{"hint chain in legacy", [][]string{{"IPT-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}}, BackendAuto, BackendLegacy},
		{"kubelet canary in legacy, foreign rules in nft", [][]string{
			{"IPT-nft", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
			{"IPT-legacy", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"},
		}, BackendAuto, BackendLegacy},
		{"only foreign legacy rules", [][]string{
			{"IPT-legacy", "-t", "nat", "-N", "KUBE-SERVICES"},
			{"IPT-legacy", "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"},
			{"IPT-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
		}, BackendAuto, BackendLegacy},
		{"more rules in nft than in legacy", [][]string{
			{"IPT-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
			{"IPT-nft", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"},
			{"IPT-nft", "-A", "OUTPUT", "-p", "tcp", "--sport", "22", "-j", "ACCEPT"},
		}, BackendAuto, BackendNFT},
		{"empty namespace", nil, BackendAuto, BackendNFT},
		{"forced legacy despite an nft hint", [][]string{{"IPT-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}}, BackendLegacy, BackendLegacy},
		{"forced nft despite a legacy hint", [][]string{{"IPT-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"}}, BackendNFT, BackendNFT},
	} {
		for _, addr := range []string{"10.96.0.2", "fd00::2"} {
			t.Run(tc.name+"/"+addr, func(t *testing.T) {
				ns := netnstest.New(t)
				rs := ruleset(t, addr)
				ipt := "iptables"
				if rs.Family == render.IPv6 {
					ipt = "ip6tables"
				}
				for _, c := range tc.setup {
					ns.Run(t, strings.Replace(c[0], "IPT", ipt, 1), c[1:]...)
				}
				r := newNSRules(t, ns, newNSExec(ns), tc.flag, rs)
				if _, err := r.Sync(context.Background()); err != nil {
					t.Fatal(err)
				}
				if r.Backend() != tc.want {
					t.Errorf("chose %s, want %s", r.Backend(), tc.want)
				}
				if n := oursInBackend(t, ns, tc.want, rs); n == 0 {
					t.Errorf("no rules of ours in %s", tc.want)
				}
				if n := oursInBackend(t, ns, other(tc.want), rs); n != 0 {
					t.Errorf("%d lines of ours in %s, the backend not chosen", n, other(tc.want))
				}
			})
		}
	}
}

// TestBackendNetnsRemovesLeftovers: rules an earlier run left in the other
// backend are removed once the backend in use has ours.
func TestBackendNetnsRemovesLeftovers(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy")
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		t.Run(string(b), func(t *testing.T) {
			ns := netnstest.New(t)
			rs := ruleset(t, "10.96.0.2")
			ctx := context.Background()
			// An earlier run with the other backend.
			if _, err := newNSRules(t, ns, newNSExec(ns), other(b), rs).Sync(ctx); err != nil {
				t.Fatal(err)
			}
			if oursInBackend(t, ns, other(b), rs) == 0 {
				t.Fatal("the earlier run left nothing to remove")
			}
			if _, err := newNSRules(t, ns, newNSExec(ns), b, rs).Sync(ctx); err != nil {
				t.Fatal(err)
			}
			if n := oursInBackend(t, ns, b, rs); n == 0 {
				t.Errorf("no rules of ours in %s", b)
			}
			if n := oursInBackend(t, ns, other(b), rs); n != 0 {
				t.Errorf("%d lines of ours left in %s", n, other(b))
			}
		})
	}
}
