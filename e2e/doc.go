// Package e2e runs the sidecar's binary end to end, in network namespaces
// the tests create and remove (internal/netnstest): as a daemon and as a
// one-shot run, on both iptables backends and both families, against real
// iptables, netlink, conntrack and TCP, with faults injected.
//
// The binary is built once per run, from the module root, with the race
// detector when the tests have it (helpers_test.go). The tests need root;
// without it they skip, and with CI=true they fail instead. `go test
// -short` skips them all and runs only the fast ones.
package e2e
