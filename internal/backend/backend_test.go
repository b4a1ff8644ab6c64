package backend

import "testing"

func TestParse(t *testing.T) {
	for _, s := range []string{"auto", "nft", "legacy"} {
		if b, err := Parse(s); err != nil || string(b) != s {
			t.Errorf("Parse(%q) = %q, %v; want %q, nil", s, b, err, s)
		}
	}
	for _, s := range []string{"", "NFT", "iptables", "nft "} {
		if b, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %q, nil; want an error", s, b)
		}
	}
	if _, err := Parse("x"); err == nil || err.Error() != `must be "auto", "nft" or "legacy"` {
		t.Errorf("Parse error = %v", err)
	}
}

func TestBinary(t *testing.T) {
	for _, tc := range []struct {
		b    Backend
		ipv6 bool
		t    Tool
		want string
	}{
		{NFT, false, IPTables, "iptables-nft"},
		{NFT, true, Restore, "ip6tables-nft-restore"},
		{Legacy, false, Save, "iptables-legacy-save"},
		{Legacy, true, IPTables, "ip6tables-legacy"},
		{"", false, Restore, "iptables-restore"},
		{"", true, Restore, "ip6tables-restore"},
	} {
		if got := Binary(tc.b, tc.ipv6, tc.t); got != tc.want {
			t.Errorf("Binary(%q, %v, %q) = %q, want %q", tc.b, tc.ipv6, tc.t, got, tc.want)
		}
	}
}
