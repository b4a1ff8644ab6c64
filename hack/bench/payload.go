package main

import (
	"crypto/sha256"
	"fmt"
	"strings"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/kubeproxy"
)

// Foreign rules: what other agents keep in a node's tables, generated as one
// iptables-restore --noflush payload. Every count is of rules ("-A" lines).

// hashName is a kube-proxy-style chain name: prefix and 16 upper-case hex
// digits of a hash of key.
func hashName(prefix, key string) string {
	sum := sha256.Sum256([]byte(key))
	return fmt.Sprintf("%s%X", prefix, sum[:8])
}

func ip4(a, b, c, d int) string { return fmt.Sprintf("%d.%d.%d.%d", a, b, c, d) }

// serviceIP and podIP spread index i over 10.0.0.0/16 and 10.244.0.0/16.
func serviceIP(i int) string { return ip4(10, 0, (i/254)%256, i%254+1) }
func podIP(i int) string     { return ip4(10, 244, (i/254)%256, i%254+1) }

// natPayload returns n rules in nat the way kube-proxy writes them:
// KUBE-SERVICES jumped from PREROUTING and OUTPUT, per service a
// KUBE-SERVICES rule, a KUBE-SVC chain choosing one of two endpoints at
// random, and per endpoint a KUBE-SEP chain that marks hairpin traffic and
// DNATs; plus KUBE-MARK-MASQ and KUBE-POSTROUTING.
func natPayload(n int) string {
	if n <= 0 {
		return ""
	}
	var decl, rules []string
	chain := func(name string) { decl = append(decl, ":"+name+" - [0:0]") }
	decl = append(decl, kubeproxy.BaseChains...)
	rules = append(rules, kubeproxy.Base[:min(n, len(kubeproxy.Base))]...)
	const perService = 7 // 1 in KUBE-SERVICES, 2 in KUBE-SVC, 2 x 2 in KUBE-SEP
	svc, ep := 0, 0
	for len(rules)+perService <= n {
		name := fmt.Sprintf("ns-%d/svc-%d:http", svc/50, svc)
		svcChain := hashName("KUBE-SVC-", name)
		chain(svcChain)
		rules = append(rules, fmt.Sprintf(`-A KUBE-SERVICES -d %s/32 -p tcp -m comment --comment "%s cluster IP" -m tcp --dport 80 -j %s`,
			serviceIP(svc), name, svcChain))
		for k := range 2 {
			pod := podIP(ep)
			sep := hashName("KUBE-SEP-", name+pod)
			chain(sep)
			if k == 0 {
				rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment "%s -> %s:8080" -m statistic --mode random --probability 0.50000000000 -j %s`, svcChain, name, pod, sep))
			} else {
				rules = append(rules, fmt.Sprintf(`-A %s -m comment --comment "%s -> %s:8080" -j %s`, svcChain, name, pod, sep))
			}
			rules = append(rules,
				fmt.Sprintf(`-A %s -s %s/32 -m comment --comment "%s" -j KUBE-MARK-MASQ`, sep, pod, name),
				fmt.Sprintf(`-A %s -p tcp -m comment --comment "%s" -m tcp -j DNAT --to-destination %s:8080`, sep, name, pod))
			ep++
		}
		svc++
	}
	// The rest: masquerade rules for traffic from outside the pod network,
	// as kube-proxy writes with --cluster-cidr.
	for i := 0; len(rules) < n; i++ {
		rules = append(rules, fmt.Sprintf(`-A KUBE-SERVICES ! -s 10.244.0.0/16 -d %s/32 -p tcp -m comment --comment "ns-x/svc-%d:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ`,
			serviceIP(i), i))
	}
	return restorePayload("nat", decl, rules)
}

// filterPayload returns n rules in filter the way CNI network-policy
// agents write them: per pod a chain jumped from FORWARD holding the
// pod's allowed peers and ports, plus a few chains jumped from INPUT and
// OUTPUT.
func filterPayload(n int) string {
	if n <= 0 {
		return ""
	}
	var decl, rules []string
	chain := func(name string) { decl = append(decl, ":"+name+" - [0:0]") }
	chain("CNI-INPUT")
	chain("CNI-OUTPUT")
	fixed := []string{
		`-A INPUT -m comment --comment "cni input policies" -j CNI-INPUT`,
		`-A OUTPUT -m comment --comment "cni output policies" -j CNI-OUTPUT`,
		`-A CNI-INPUT -p tcp -m tcp --dport 10250 -m comment --comment "kubelet" -j ACCEPT`,
		`-A CNI-INPUT -p udp -m udp --dport 8472 -m comment --comment "vxlan" -j ACCEPT`,
		`-A CNI-OUTPUT -p udp -m udp --dport 8472 -m comment --comment "vxlan" -j ACCEPT`,
	}
	rules = append(rules, fixed[:min(n, len(fixed))]...)
	const perPod = 10 // a jump from FORWARD, 8 allowed peers, a RETURN
	pod := 0
	for len(rules)+perPod <= n {
		c := fmt.Sprintf("CNI-POL-%d", pod)
		chain(c)
		rules = append(rules, fmt.Sprintf(`-A FORWARD -d %s/32 -m comment --comment "pod ns-%d/pod-%d" -j %s`, podIP(pod), pod/50, pod, c))
		for k := range 8 {
			rules = append(rules, fmt.Sprintf(`-A %s -s %s/32 -p tcp -m tcp --dport %d -m comment --comment "policy ns-%d/allow-%d" -j ACCEPT`,
				c, podIP(pod*8+k+1), 8000+k, pod/50, k))
		}
		rules = append(rules, "-A "+c+" -j RETURN")
		pod++
	}
	for i := 0; len(rules) < n; i++ {
		rules = append(rules, fmt.Sprintf(`-A CNI-INPUT -s %s/32 -p tcp -m tcp --dport 9100 -m comment --comment "policy node-exporter-%d" -j ACCEPT`, podIP(i), i))
	}
	return restorePayload("filter", decl, rules)
}

func restorePayload(table string, decl, rules []string) string {
	var b strings.Builder
	b.WriteString("*" + table + "\n")
	for _, l := range decl {
		b.WriteString(l + "\n")
	}
	for _, l := range rules {
		b.WriteString(l + "\n")
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// scenario is one backend and one set of foreign rules.
type scenario struct {
	Backend string // "nft" or "legacy"
	Table   string // "nat" or "filter"; "" with no foreign rules
	Rules   int
}

func (s scenario) String() string {
	if s.Rules == 0 {
		return s.Backend + ", no foreign rules"
	}
	return fmt.Sprintf("%s, %s in %s", s.Backend, thousands(s.Rules), s.Table)
}

// payload returns the scenario's foreign rules as restore input.
func (s scenario) payload() string {
	switch s.Table {
	case "nat":
		return natPayload(s.Rules)
	case "filter":
		return filterPayload(s.Rules)
	}
	return ""
}

func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
