// Package backend names the iptables backends and their programs, for the
// flag's validation and for the code that runs them. It imports nothing of
// the project, so that every package may use it.
package backend

import (
	"fmt"
	"time"
)

// Backend is an iptables backend, or Auto. The programs of each backend
// are called by their own names (iptables-nft-restore,
// ip6tables-legacy-save, ...), never through the iptables alternative,
// whose meaning depends on the image.
type Backend string

// The iptables backends.
const (
	NFT    Backend = "nft"
	Legacy Backend = "legacy"
	// Auto detects the backend the host uses.
	Auto Backend = "auto"
)

// Parse returns the backend s names, or an error that lists the names.
func Parse(s string) (Backend, error) {
	switch b := Backend(s); b {
	case Auto, NFT, Legacy:
		return b, nil
	}
	return "", fmt.Errorf("must be %q, %q or %q", Auto, NFT, Legacy)
}

// Tool is one of the iptables programs.
type Tool string

// The iptables programs.
const (
	IPTables Tool = ""
	Restore  Tool = "-restore"
	Save     Tool = "-save"
)

// Binary returns the name of program t of backend b for IPv4 or IPv6, such
// as "ip6tables-nft-restore". With b "" it is the alternative's name
// ("ip6tables-restore"), which only ever names the program to a reader.
// This is the one place program names are made.
func Binary(b Backend, ipv6 bool, t Tool) string {
	base := "iptables"
	if ipv6 {
		base = "ip6tables"
	}
	if b != "" {
		base += "-" + string(b)
	}
	return base + string(t)
}

// LockWait is how long a write waits for the xtables lock
// (iptables-restore --wait; the nft backend ignores the lock) before it
// fails and is retried at the next sync. A program's timeout must exceed
// it.
const LockWait = 5 * time.Second
