package apply

import (
	"context"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	testingexec "k8s.io/utils/exec/testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

const (
	nftNoHint    = "iptables v1.8.9 (nf_tables): chain `KUBE-IPTABLES-HINT' in table `mangle' is incompatible, use 'nft' tool.\n"
	legacyMangle = "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
)

// nftHints is the nft probe for both hint chains, finding neither.
func nftHints(bin string) []call {
	return []call{
		{argv: bin + " -t mangle -S KUBE-IPTABLES-HINT", exit: 1, stderr: nftNoHint},
		{argv: bin + " -t mangle -S KUBE-KUBELET-CANARY", exit: 1, stderr: nftNoHint},
	}
}

// nftCounts is the nft count of rules in the built-in chains, with rules
// rules in nat PREROUTING and none elsewhere.
func nftCounts(bin string, rules int) []call {
	var calls []call
	for _, t := range builtinChains {
		for _, c := range t.chains {
			out := "-P " + c + " ACCEPT\n"
			if t.table == "nat" && c == "PREROUTING" {
				out += strings.Repeat("-A PREROUTING -j KUBE-SERVICES\n", rules)
			}
			calls = append(calls, call{argv: bin + " -t " + t.table + " -S " + c, stdout: out})
		}
	}
	return calls
}

func TestDetect(t *testing.T) {
	legacyNames := map[string]string{ipTablesNames: "mangle\nnat\nfilter\n"}
	for _, tc := range []struct {
		name     string
		family   render.Family
		proc     map[string]string
		noLegacy bool // iptables-legacy-save is not in PATH
		calls    []call
		want     Detection
		wantErr  string
	}{
		{
			name:  "hint chain in nft",
			calls: []call{{argv: "iptables-nft -t mangle -S KUBE-IPTABLES-HINT", stdout: "-N KUBE-IPTABLES-HINT\n"}},
			want:  Detection{BackendNFT, "chain KUBE-IPTABLES-HINT in mangle, seen with iptables-nft"},
		},
		{
			name: "kubelet canary in nft",
			calls: []call{
				{argv: "iptables-nft -t mangle -S KUBE-IPTABLES-HINT", exit: 1, stderr: nftNoHint},
				{argv: "iptables-nft -t mangle -S KUBE-KUBELET-CANARY", stdout: "-N KUBE-KUBELET-CANARY\n"},
			},
			want: Detection{BackendNFT, "chain KUBE-KUBELET-CANARY in mangle, seen with iptables-nft"},
		},
		{
			name: "hint chain in legacy settles it after reading mangle alone",
			proc: legacyNames,
			calls: append(nftHints("iptables-nft"),
				call{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + ":KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"}),
			want: Detection{BackendLegacy, "chain KUBE-IPTABLES-HINT in mangle, seen with iptables-legacy-save"},
		},
		{
			name:   "IPv6 probes ip6tables and ip6_tables_names",
			family: render.IPv6,
			proc:   map[string]string{"/proc/net/ip6_tables_names": "mangle\n"},
			calls: append(nftHints("ip6tables-nft"),
				call{argv: "ip6tables-legacy-save -t mangle", stdout: legacyMangle + ":KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"}),
			want: Detection{BackendLegacy, "chain KUBE-KUBELET-CANARY in mangle, seen with ip6tables-legacy-save"},
		},
		{
			name:  "no legacy in the kernel: nft, legacy never probed",
			calls: nftHints("iptables-nft"),
			want:  Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default"},
		},
		{
			name:  "legacy loaded but no tables: nothing read",
			proc:  map[string]string{ipTablesNames: ""},
			calls: nftHints("iptables-nft"),
			want:  Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default"},
		},
		{
			name:     "legacy tables but no legacy programs: not probed, said so",
			proc:     legacyNames,
			noLegacy: true,
			calls:    nftHints("iptables-nft"),
			want:     Detection{BackendNFT, "no hint chain and no legacy rules; nft is the default (legacy tables exist, but without iptables-legacy-save they were not probed)"},
		},
		{
			name: "more rules in legacy",
			proc: legacyNames,
			calls: append(append(nftHints("iptables-nft"),
				call{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + "COMMIT\n"},
				call{argv: "iptables-legacy-save -t nat", stdout: "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"},
				call{argv: "iptables-legacy-save -t filter", stdout: "*filter\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n"}),
				nftCounts("iptables-nft", 2)...),
			want: Detection{BackendLegacy, "no hint chain; 3 legacy rules against 2 nft rules in the built-in chains"},
		},
		{
			name: "as many rules in nft",
			proc: legacyNames,
			calls: append(append(nftHints("iptables-nft"),
				call{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + "-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff\nCOMMIT\n"},
				call{argv: "iptables-legacy-save -t nat", stdout: "*nat\nCOMMIT\n"},
				call{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"}),
				nftCounts("iptables-nft", 1)...),
			want: Detection{BackendNFT, "no hint chain; 1 nft rules against 1 legacy rules in the built-in chains"},
		},
		{
			name: "nft probe fails and legacy has no hint: error",
			proc: legacyNames,
			calls: []call{
				{argv: "iptables-nft -t mangle -S KUBE-IPTABLES-HINT", exit: 4, stderr: "Could not fetch rule set generation id: Permission denied (you must be root)\n"},
				{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + "COMMIT\n"},
				{argv: "iptables-legacy-save -t nat", stdout: "*nat\nCOMMIT\n"},
				{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"},
			},
			wantErr: "Permission denied (you must be root)",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fe := fakeExec(t, tc.calls...).(*testingexec.FakeExec)
			if tc.noLegacy {
				fe.LookPathFunc = func(name string) (string, error) {
					if strings.Contains(name, "legacy") {
						return "", &testingexec.FakeExitError{Status: 127}
					}
					return "/usr/sbin/" + name, nil
				}
			}
			family := tc.family
			if family == 0 {
				family = render.IPv4
			}
			r := runner{exec: fe, timeout: defaultTimeout, readFile: fakeProc(tc.proc)}
			got, err := r.Detect(context.Background(), family)
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
	// Detect legacy by its hint, write there, then find nothing of ours in
	// nft; a second sync is converged and reads legacy alone.
	names := map[string]string{ipTablesNames: "mangle\nraw\nfilter\n"}
	calls := append(nftHints("iptables-nft"),
		call{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + ":KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"},
		call{argv: "iptables-legacy-save -t raw", stdout: legacyRawSave},
		call{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"},
		call{argv: "iptables-legacy-restore --noflush --wait=5", stdin: "*filter\n" + strings.SplitN(string(rs.Payload()), "*filter\n", 2)[1]})
	calls = append(calls, legacyConverged()...)
	calls = append(calls, noneOfOursNFT("iptables-nft")...)
	calls = append(calls, legacyConverged()...)
	r, _ := newRules(t, BackendAuto, rs, names, calls...)
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i, err)
		}
	}
	if r.Backend() != BackendLegacy {
		t.Errorf("backend %q, want legacy", r.Backend())
	}
}

func TestRulesRemovesOursFromTheOtherBackend(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	// nft is forced and converged; legacy still holds our filter chain and
	// jump from an earlier run: they are removed, once.
	calls := append(converged(),
		call{argv: "iptables-legacy-save -t filter", stdout: legacyFilterSave},
		call{argv: "iptables-legacy-restore --noflush --wait=5", stdin: "*filter\n:APISERVER-PROXY-INPUT - [0:0]\n" +
			"-D INPUT -j APISERVER-PROXY-INPUT\n-X APISERVER-PROXY-INPUT\nCOMMIT\n"})
	calls = append(calls, converged()...)
	r, _ := newRules(t, BackendNFT, rs, map[string]string{ipTablesNames: "filter\n"}, calls...)
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i, err)
		}
	}
}

func TestRulesRedetectsWhenOursMoved(t *testing.T) {
	rs := ruleset(t, "10.96.0.2")
	names := map[string]string{ipTablesNames: "mangle\nraw\nfilter\n"}
	// First sync: nft by its hint, converged, nothing in legacy.
	calls := []call{{argv: "iptables-nft -t mangle -S KUBE-IPTABLES-HINT", stdout: "-N KUBE-IPTABLES-HINT\n"}}
	calls = append(calls, converged()...)
	calls = append(calls,
		call{argv: "iptables-legacy-save -t raw", stdout: "*raw\nCOMMIT\n"},
		call{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"})
	// Second sync: ours are gone from nft and present in legacy, which now
	// has the hint: legacy is chosen and, being converged, left alone; our
	// leftovers in nft (none) are looked for.
	calls = append(calls, noneOfOursNFT("iptables-nft")...)
	calls = append(calls,
		call{argv: "iptables-legacy-save -t raw", stdout: legacyRawSave},
		call{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"})
	calls = append(calls, nftHints("iptables-nft")...)
	calls = append(calls,
		call{argv: "iptables-legacy-save -t mangle", stdout: legacyMangle + ":KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"},
		call{argv: "iptables-legacy-save -t raw", stdout: legacyRawSave},
		call{argv: "iptables-legacy-save -t filter", stdout: "*filter\nCOMMIT\n"},
		call{argv: "iptables-legacy-restore --noflush --wait=5", stdin: "*filter\n" + strings.SplitN(string(rs.Payload()), "*filter\n", 2)[1]})
	calls = append(calls, legacyConverged()...)
	calls = append(calls, noneOfOursNFT("iptables-nft")...)
	r, _ := newRules(t, BackendAuto, rs, names, calls...)
	for i := range 2 {
		if _, err := r.Sync(context.Background()); err != nil {
			t.Fatalf("sync %d: %v", i, err)
		}
	}
	if r.Backend() != BackendLegacy {
		t.Errorf("backend %q, want legacy after the move", r.Backend())
	}
}

func TestRulesMissingProgramIsNamed(t *testing.T) {
	rs := ruleset(t, "fd00::2")
	r, _ := newRules(t, BackendLegacy, rs, nil)
	r.run.exec.(*testingexec.FakeExec).LookPathFunc = func(name string) (string, error) {
		if name == "ip6tables-legacy-restore" {
			return "", &testingexec.FakeExitError{Status: 127}
		}
		return "/usr/sbin/" + name, nil
	}
	_, err := r.Sync(context.Background())
	if err == nil || !strings.Contains(err.Error(), "ip6tables-legacy-restore") {
		t.Fatalf("error %v, want one naming ip6tables-legacy-restore", err)
	}
}
