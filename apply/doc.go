// Package apply puts the sidecar's address and rendered ruleset in place
// and keeps them there. It owns every side effect of the program: netlink
// for the address (Address), the iptables programs for the rules (Rules),
// and the sync loop and clean-up that combine them (Sidecar). Each talks to
// the kernel through a narrow seam (a netlink handle, k8s.io/utils/exec),
// so unit tests run against fakes and the network-namespace tests against
// the real kernel.
package apply
