package apply

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

func TestDetect(t *testing.T) {
	// legacyTables gives legacy mangle, nat and filter, with lines in each.
	legacyTables := func(n *fakeNode, f render.Family, mangle, nat, filter []string) {
		n.set(BackendLegacy, f, "mangle", mangle...)
		n.set(BackendLegacy, f, "nat", nat...)
		n.set(BackendLegacy, f, "filter", filter...)
	}
	save := func(table string) string { return "iptables-legacy-save -t " + table }
	for _, tc := range []struct {
		name   string
		family render.Family
		given  func(n *fakeNode)
		// ran is what runs: nft is read over nfnetlink, legacy with -save.
		ran     []string
		want    Detection
		wantErr string
	}{
		{
			name:  "hint chain in nft",
			given: func(n *fakeNode) { n.set(BackendNFT, render.IPv4, "mangle", "-N KUBE-IPTABLES-HINT") },
			want:  Detection{BackendNFT, "chain KUBE-IPTABLES-HINT in mangle, seen with nfnetlink"},
		},
		{
			name:  "kubelet canary in nft",
			given: func(n *fakeNode) { n.set(BackendNFT, render.IPv4, "mangle", "-N KUBE-KUBELET-CANARY") },
			want:  Detection{BackendNFT, "chain KUBE-KUBELET-CANARY in mangle, seen with nfnetlink"},
		},
		{
			name:  "hint chain in legacy settles it after reading mangle alone",
			given: func(n *fakeNode) { legacyTables(n, render.IPv4, []string{"-N KUBE-IPTABLES-HINT"}, nil, nil) },
			ran:   []string{save("mangle")},
			want:  Detection{BackendLegacy, "chain KUBE-IPTABLES-HINT in mangle, seen with iptables-legacy-save"},
		},
		{
			name:   "IPv6 probes ip6tables and ip6_tables_names",
			family: render.IPv6,
			given: func(n *fakeNode) {
				n.set(BackendLegacy, render.IPv6, "mangle", "-N KUBE-KUBELET-CANARY")
				legacyTables(n, render.IPv4, []string{"-N KUBE-IPTABLES-HINT"}, nil, nil) // not this family's
			},
			ran:  []string{"ip6tables-legacy-save -t mangle"},
			want: Detection{BackendLegacy, "chain KUBE-KUBELET-CANARY in mangle, seen with ip6tables-legacy-save"},
		},
		{
			name:  "no legacy in the kernel: nft, legacy never probed",
			given: func(*fakeNode) {},
			want:  Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default"},
		},
		{
			name:  "legacy loaded but no tables: nothing read",
			given: func(n *fakeNode) { n.loadLegacy(render.IPv4) },
			want:  Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default"},
		},
		{
			name: "legacy tables but no legacy programs: not probed, said so",
			given: func(n *fakeNode) {
				legacyTables(n, render.IPv4, []string{"-N KUBE-IPTABLES-HINT"}, nil, nil)
				n.missing["iptables-legacy-save"] = true
			},
			want: Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default (legacy tables exist, but without iptables-legacy-save they were not probed)"},
		},
		{
			name: "more rules in legacy",
			given: func(n *fakeNode) {
				legacyTables(n, render.IPv4, nil,
					[]string{"-N KUBE-SERVICES", "-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES", "-A KUBE-SERVICES -j RETURN"},
					[]string{"-N KUBE-FIREWALL", "-A INPUT -j KUBE-FIREWALL"})
				n.set(BackendNFT, render.IPv4, "nat", "-N KUBE-SERVICES", "-A PREROUTING -j KUBE-SERVICES", "-A PREROUTING -j KUBE-SERVICES")
			},
			ran:  []string{save("mangle"), save("nat"), save("filter")},
			want: Detection{BackendLegacy, "no hint chain; 3 legacy rules against 2 nft rules in the built-in chains"},
		},
		{
			name: "as many rules in nft",
			given: func(n *fakeNode) {
				legacyTables(n, render.IPv4, []string{"-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff"}, nil, nil)
				n.set(BackendNFT, render.IPv4, "nat", "-N KUBE-SERVICES", "-A PREROUTING -j KUBE-SERVICES")
			},
			ran:  []string{save("mangle"), save("nat"), save("filter")},
			want: Detection{BackendNFT, "no hint chain; 1 nft rules against 1 legacy rules in the built-in chains"},
		},
		{
			name: "nft probe fails and legacy has no hint: error",
			given: func(n *fakeNode) {
				legacyTables(n, render.IPv4, nil, nil, nil)
				n.nfnlErr = errors.New("looking up nftables chain KUBE-IPTABLES-HINT in table mangle: operation not permitted")
			},
			ran:     []string{save("mangle"), save("nat"), save("filter")},
			wantErr: "operation not permitted",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newFakeNode(t)
			tc.given(n)
			before := n.Dump()
			family := tc.family
			if family == 0 {
				family = render.IPv4
			}
			got, err := runner{node: n, timeout: defaultTimeout}.Detect(context.Background(), family)
			if diff := cmp.Diff(tc.ran, n.takeRan()); diff != "" {
				t.Errorf("programs run (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(before, n.Dump()); diff != "" {
				t.Errorf("Detect changed the node (-before +after):\n%s", diff)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("detection (-want +got):\n%s", diff)
			}
		})
	}
}

func TestRulesAutoChoosesDetectedBackend(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	// legacy by its hint; raw holds ours already, filter nothing: the
	// first sync writes filter; the second finds legacy converged and
	// reads legacy alone.
	n := newFakeNode(t)
	n.set(BackendLegacy, render.IPv4, "mangle", "-N KUBE-IPTABLES-HINT")
	legacyRaw(n)
	n.set(BackendLegacy, render.IPv4, "filter")
	r, _ := n.rules(BackendAuto, rs)
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatalf("sync 1: %v", err)
	}
	if diff := cmp.Diff([]string{"*filter\n" + strings.SplitN(string(rs.Payload()), "*filter\n", 2)[1]}, n.payloads); diff != "" {
		t.Errorf("restore input (-want +got):\n%s", diff)
	}
	n.takeRan()
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatalf("sync 2: %v", err)
	}
	if diff := cmp.Diff([]string{"iptables-legacy-save -t raw", "iptables-legacy-save -t filter"}, n.takeRan()); diff != "" {
		t.Errorf("second sync ran (-want +got):\n%s", diff)
	}
	if r.Backend() != BackendLegacy {
		t.Errorf("backend %q, want legacy", r.Backend())
	}
	wantNode(t, n, BackendLegacy, rs, nil)
}

func TestRulesRemovesOursFromTheOtherBackend(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	// nft is forced and converged; legacy still holds our filter chain and
	// jump from an earlier run: they are removed, once, and the foreign
	// rules stay.
	n := newFakeNode(t).converged(BackendNFT, rs)
	n.set(BackendLegacy, render.IPv4, "filter", "-P INPUT DROP", "-N APISERVER-PROXY-INPUT", "-N KUBE-FIREWALL",
		"-A INPUT -j KUBE-FIREWALL", jumpIn, inRule)
	r, _ := n.rules(BackendNFT, rs)
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i, err)
		}
		want := []string{"iptables-legacy-save -t filter", restoreLegacy}
		if i == 1 {
			want = nil
		}
		if diff := cmp.Diff(want, n.takeRan()); diff != "" {
			t.Errorf("sync %d ran (-want +got):\n%s", i+1, diff)
		}
	}
	if diff := cmp.Diff([]string{"*filter\n:APISERVER-PROXY-INPUT - [0:0]\n-D INPUT -j APISERVER-PROXY-INPUT\n-X APISERVER-PROXY-INPUT\nCOMMIT\n"}, n.payloads); diff != "" {
		t.Errorf("restore input (-want +got):\n%s", diff)
	}
	wantNode(t, n, BackendNFT, rs, []string{
		"legacy IPv4 filter -P INPUT DROP", "legacy IPv4 filter -A INPUT -j KUBE-FIREWALL",
		"legacy IPv4 filter -P FORWARD ACCEPT", "legacy IPv4 filter -P OUTPUT ACCEPT", "legacy IPv4 filter -N KUBE-FIREWALL",
		"nft IPv4 filter -P INPUT ACCEPT", "nft IPv4 filter -P FORWARD ACCEPT", "nft IPv4 filter -P OUTPUT ACCEPT",
		"nft IPv4 raw -P PREROUTING ACCEPT", "nft IPv4 raw -P OUTPUT ACCEPT",
	})
}

func TestRulesRedetectsWhenOursMoved(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	// First sync: nft by its hint, converged, nothing in legacy.
	n := newFakeNode(t).converged(BackendNFT, rs)
	n.set(BackendNFT, render.IPv4, "mangle", "-N KUBE-IPTABLES-HINT")
	n.set(BackendLegacy, render.IPv4, "mangle")
	n.set(BackendLegacy, render.IPv4, "raw")
	n.set(BackendLegacy, render.IPv4, "filter")
	r, _ := n.rules(BackendAuto, rs)
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatalf("sync 1: %v", err)
	}
	if diff := cmp.Diff([]string{"iptables-legacy-save -t raw", "iptables-legacy-save -t filter"}, n.takeRan()); diff != "" {
		t.Errorf("sync 1 ran (-want +got):\n%s", diff)
	}
	if r.Backend() != BackendNFT {
		t.Fatalf("backend %q after sync 1, want nft", r.Backend())
	}
	// The host moved to legacy: ours are gone from nft and present in
	// legacy, which has the hint. Legacy is chosen, its missing filter
	// chains written, and nft (holding nothing of ours) left alone.
	n.clear(BackendNFT, render.IPv4)
	n.set(BackendLegacy, render.IPv4, "mangle", "-N KUBE-IPTABLES-HINT")
	legacyRaw(n)
	if _, err := r.Sync(context.Background()); err != nil {
		t.Fatalf("sync 2: %v", err)
	}
	if r.Backend() != BackendLegacy {
		t.Errorf("backend %q, want legacy after the move", r.Backend())
	}
	if diff := cmp.Diff([]string{"*filter\n" + strings.SplitN(string(rs.Payload()), "*filter\n", 2)[1]}, n.payloads); diff != "" {
		t.Errorf("restore input (-want +got):\n%s", diff)
	}
	wantNode(t, n, BackendLegacy, rs, nil)
}

func TestRulesMissingProgramIsNamed(t *testing.T) {
	rs := ruleset(t, "fd00::2")
	n := newFakeNode(t)
	n.missing["ip6tables-legacy-restore"] = true
	r, _ := n.rules(BackendLegacy, rs)
	_, err := r.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "ip6tables-legacy-restore") {
		t.Fatalf("error %v, want one naming ip6tables-legacy-restore", err)
	}
	if ran := n.takeRan(); len(ran) != 0 {
		t.Errorf("ran %q without the program", ran)
	}
}
