package kubeproxy

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

func TestKubernetesService(t *testing.T) {
	for _, tc := range []struct {
		clusterIP, endpoint string
		want                []string
	}{
		{"100.64.0.1:443", "10.96.0.2:443", []string{
			`^-A KUBE-SERVICES -d 100\.64\.0\.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-[0-9A-Z]{16}$`,
			`^-A KUBE-SEP-[0-9A-Z]{16} -s 10\.96\.0\.2/32 .*-j KUBE-MARK-MASQ$`,
			`^-A KUBE-SEP-[0-9A-Z]{16} -p tcp .*-m tcp -j DNAT --to-destination 10\.96\.0\.2:443$`,
		}},
		{"[fd00:64::1]:443", "[fd00:96::2]:6443", []string{
			`^-A KUBE-SERVICES -d fd00:64::1/128 -p tcp .* --dport 443 -j KUBE-SVC-[0-9A-Z]{16}$`,
			`^-A KUBE-SEP-[0-9A-Z]{16} -s fd00:96::2/128 .*-j KUBE-MARK-MASQ$`,
			`^-A KUBE-SEP-[0-9A-Z]{16} -p tcp .*-j DNAT --to-destination \[fd00:96::2\]:6443$`,
		}},
	} {
		p := KubernetesService(netip.MustParseAddrPort(tc.clusterIP), netip.MustParseAddrPort(tc.endpoint))
		if !strings.HasPrefix(p, "*nat\n") || !strings.HasSuffix(p, "\nCOMMIT\n") {
			t.Errorf("%s: not one nat table for iptables-restore:\n%s", tc.clusterIP, p)
		}
		declared := map[string]bool{"PREROUTING": true, "OUTPUT": true, "POSTROUTING": true}
		byChain := map[string]int{}
		total := 0
		jump := regexp.MustCompile(` -j (KUBE-[A-Z0-9-]+)`)
		for _, l := range strings.Split(p, "\n") {
			switch {
			case strings.HasPrefix(l, ":"):
				name, _, _ := strings.Cut(l[1:], " ")
				if declared[name] {
					t.Errorf("%s: chain %s declared twice", tc.clusterIP, name)
				}
				declared[name] = true
			case strings.HasPrefix(l, "-A "):
				chain, _, _ := strings.Cut(l[3:], " ")
				if !declared[chain] {
					t.Errorf("%s: rule in an undeclared chain: %s", tc.clusterIP, l)
				}
				if m := jump.FindStringSubmatch(l); m != nil && !declared[m[1]] {
					t.Errorf("%s: jump to an undeclared chain: %s", tc.clusterIP, l)
				}
				byChain[chain]++
				total++
			}
		}
		if total != 11 || byChain["PREROUTING"] != 1 || byChain["OUTPUT"] != 1 || byChain["POSTROUTING"] != 1 {
			t.Errorf("%s: %d rules, by chain %v; want 11, one jump each from PREROUTING, OUTPUT and POSTROUTING", tc.clusterIP, total, byChain)
		}
		for _, w := range tc.want {
			if !regexp.MustCompile("(?m)" + w).MatchString(p) {
				t.Errorf("%s: no line matching %s:\n%s", tc.clusterIP, w, p)
			}
		}
	}
}
