package xtables

import (
	"strconv"
	"testing"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// benchTable is a namespace whose legacy filter table holds our rules and
// n foreign rules, and a socket on it.
func benchTable(b *testing.B, n int) *Socket {
	b.Helper()
	netnstest.RequireBinaries(b, "iptables-legacy-restore")
	ns := netnstest.New(b)
	ts := tables{}
	ts.manyRules(IPv4, "filter", n)
	ts.addOurs(b, addrs(IPv4)...)
	restore(b, ns, IPv4, ts.text())
	return open(b, ns, IPv4)
}

// BenchmarkInfo is the cost of one poll of a table for changes: it does
// not grow with the table.
func BenchmarkInfo(b *testing.B) {
	for _, n := range []int{0, 50000} {
		b.Run(strconv.Itoa(n)+"_rules", func(b *testing.B) {
			s := benchTable(b, n)
			for b.Loop() {
				if _, err := s.Info("filter"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRead is the cost of reading and walking a whole table.
func BenchmarkRead(b *testing.B) {
	for _, n := range []int{0, 1000, 50000} {
		b.Run(strconv.Itoa(n)+"_rules", func(b *testing.B) {
			s := benchTable(b, n)
			b.ReportAllocs()
			for b.Loop() {
				walkTable(b, s, "filter")
			}
		})
	}
}
