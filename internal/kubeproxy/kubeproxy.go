// Package kubeproxy writes, as iptables-restore input, the nat rules
// kube-proxy in iptables mode writes: what the tests and the measuring
// harnesses put in front of the sidecar, so that its clients reach it the
// way they do on a node.
package kubeproxy

import (
	"net/netip"
	"strconv"
	"strings"
)

// Base are the rules kube-proxy writes into nat whatever its Services:
// the jumps to KUBE-SERVICES and KUBE-POSTROUTING, and the marking and
// masquerading of hairpin traffic. Their chains are declared by
// BaseChains.
var Base = []string{
	`-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
	`-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES`,
	`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING`,
	`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000`,
	`-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN`,
	`-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0`,
	`-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully`,
}

// BaseChains declare the chains of Base.
var BaseChains = []string{":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"}

// The chains kube-proxy names for the `kubernetes` Service's https port
// and its endpoint (the names are hashes; these are real ones).
const (
	kubernetesSVC = "KUBE-SVC-NPX46M4PTMTKRN6Y"
	kubernetesSEP = "KUBE-SEP-ZTTJ5EA4YGZXTPDU"
)

// KubernetesService is the nat table kube-proxy writes for the
// `kubernetes` Service at clusterIP with one endpoint: Base, the Service's
// rule in KUBE-SERVICES, its KUBE-SVC chain and the endpoint's KUBE-SEP
// chain, which marks hairpin traffic and DNATs. Both addresses are of one
// family.
func KubernetesService(clusterIP, endpoint netip.AddrPort) string {
	bits := "/" + strconv.Itoa(clusterIP.Addr().BitLen())
	const name = "default/kubernetes:https"
	lines := []string{"*nat"}
	lines = append(lines, BaseChains...)
	lines = append(lines, ":"+kubernetesSVC+" - [0:0]", ":"+kubernetesSEP+" - [0:0]")
	lines = append(lines, Base...)
	lines = append(lines,
		`-A KUBE-SERVICES -d `+clusterIP.Addr().String()+bits+` -p tcp -m comment --comment "`+name+` cluster IP" -m tcp --dport `+strconv.Itoa(int(clusterIP.Port()))+` -j `+kubernetesSVC,
		`-A `+kubernetesSVC+` -m comment --comment "`+name+` -> `+endpoint.String()+`" -j `+kubernetesSEP,
		`-A `+kubernetesSEP+` -s `+endpoint.Addr().String()+bits+` -m comment --comment "`+name+`" -j KUBE-MARK-MASQ`,
		`-A `+kubernetesSEP+` -p tcp -m comment --comment "`+name+`" -m tcp -j DNAT --to-destination `+endpoint.String(),
		"COMMIT",
		"",
	)
	return strings.Join(lines, "\n")
}
