package config

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spf13/pflag"
)

func valid() Flags {
	return Flags{IPAddress: "10.96.0.2", Port: "443", Interface: "lo", SyncInterval: time.Minute, Backend: "auto", IPTablesTimeout: 30 * time.Second, Daemon: true}
}

func TestValidateAccepts(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edit  func(*Flags)
		addrs []string
		port  uint16
	}{
		{"defaults", func(*Flags) {}, []string{"10.96.0.2"}, 443},
		{"IPv6", func(f *Flags) { f.IPAddress = "fd00::2" }, []string{"fd00::2"}, 443},
		{"dual-stack", func(f *Flags) { f.IPAddress = "10.96.0.2,fd00::2" }, []string{"10.96.0.2", "fd00::2"}, 443},
		{"dual-stack IPv6 first is reordered", func(f *Flags) { f.IPAddress = "fd00::2,10.96.0.2" }, []string{"10.96.0.2", "fd00::2"}, 443},
		{"proxy address and ClusterIP", func(f *Flags) { f.IPAddress = "10.96.0.2,100.64.0.1" }, []string{"10.96.0.2", "100.64.0.1"}, 443},
		{"ClusterIP first keeps its place", func(f *Flags) { f.IPAddress = "100.64.0.1,10.96.0.2" }, []string{"100.64.0.1", "10.96.0.2"}, 443},
		{"dual-stack with a ClusterIP per family", func(f *Flags) { f.IPAddress = "fd00::2,10.96.0.2,fd00:10:96::1,100.64.0.1" }, []string{"10.96.0.2", "100.64.0.1", "fd00::2", "fd00:10:96::1"}, 443},
		{"eight addresses", func(f *Flags) { f.IPAddress = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,fd00::1,fd00::2,fd00::3,fd00::4" }, []string{"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "fd00::1", "fd00::2", "fd00::3", "fd00::4"}, 443},
		{"port 1", func(f *Flags) { f.Port = "1" }, []string{"10.96.0.2"}, 1},
		{"port 65535", func(f *Flags) { f.Port = "65535" }, []string{"10.96.0.2"}, 65535},
		{"legacy backend", func(f *Flags) { f.Backend = "legacy" }, []string{"10.96.0.2"}, 443},
		{"15-byte interface", func(f *Flags) { f.Interface = "apiserver-proxy" }, []string{"10.96.0.2"}, 443},
		{"sync interval at the floor", func(f *Flags) { f.SyncInterval = MinSyncInterval }, []string{"10.96.0.2"}, 443},
		{"sync interval below the floor, lifted", func(f *Flags) { f.SyncInterval, f.UnsafeShortSyncInterval = 10*time.Millisecond, true }, []string{"10.96.0.2"}, 443},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := valid()
			tc.edit(&f)
			cfg, err := f.Validate()
			if err != nil {
				t.Fatal(err)
			}
			var want []netip.Addr
			for _, a := range tc.addrs {
				want = append(want, netip.MustParseAddr(a))
			}
			if diff := cmp.Diff(want, cfg.Addrs, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("addrs (-want +got):\n%s", diff)
			}
			if cfg.Port != tc.port || cfg.Interface != f.Interface || cfg.SyncInterval != f.SyncInterval || !cfg.Daemon {
				t.Errorf("config = %+v, want port %d and the flags' other values", cfg, tc.port)
			}
		})
	}
}

func TestValidateBindAddresses(t *testing.T) {
	for _, tc := range []struct {
		health, metrics         string
		wantHealth, wantMetrics string
	}{
		{"", "", "", ""},
		{"0", "0", "", ""},
		{"127.0.0.1:16911", ":16910", "127.0.0.1:16911", ":16910"},
		{"localhost:16911", "0.0.0.0:16910", "localhost:16911", "0.0.0.0:16910"},
		{"[::1]:16911", "[::]:16910", "[::1]:16911", "[::]:16910"},
		{"127.0.0.1:65535", "0", "127.0.0.1:65535", ""},
		{"0", ":1", "", ":1"},
	} {
		t.Run(tc.health+" "+tc.metrics, func(t *testing.T) {
			f := valid()
			f.HealthProbeBindAddress, f.MetricsBindAddress = tc.health, tc.metrics
			cfg, err := f.Validate()
			if err != nil {
				t.Fatal(err)
			}
			if cfg.HealthProbeBindAddress != tc.wantHealth || cfg.MetricsBindAddress != tc.wantMetrics {
				t.Errorf("health %q, metrics %q; want %q, %q", cfg.HealthProbeBindAddress, cfg.MetricsBindAddress, tc.wantHealth, tc.wantMetrics)
			}
		})
	}
}

// TestValidateRefuses covers every kind of input that must be refused. The
// error must name the flag and show the value.
func TestValidateRefuses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flag  string
		value string
		edit  func(*Flags)
	}{
		{"missing address", "ip-address", "", func(f *Flags) { f.IPAddress = "" }},
		{"not an address", "ip-address", "10.96.0", func(f *Flags) { f.IPAddress = "10.96.0" }},
		{"hostname", "ip-address", "apiserver", func(f *Flags) { f.IPAddress = "apiserver" }},
		{"zone", "ip-address", "fe80::1%eth0", func(f *Flags) { f.IPAddress = "fe80::1%eth0" }},
		{"prefix", "ip-address", "10.96.0.2/32", func(f *Flags) { f.IPAddress = "10.96.0.2/32" }},
		{"unspecified IPv4", "ip-address", "0.0.0.0", func(f *Flags) { f.IPAddress = "0.0.0.0" }},
		{"unspecified IPv6", "ip-address", "::", func(f *Flags) { f.IPAddress = "::" }},
		{"IPv4 twice", "ip-address", "10.96.0.2,10.96.0.2", func(f *Flags) { f.IPAddress = "10.96.0.2,10.96.0.2" }},
		{"IPv6 twice, written two ways", "ip-address", "fd00::2,100.64.0.1,fd00:0::2", func(f *Flags) { f.IPAddress = "fd00::2,100.64.0.1,fd00:0::2" }},
		{"nine addresses", "ip-address", "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,10.0.0.9", func(f *Flags) {
			f.IPAddress = "10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8,10.0.0.9"
		}},
		{"empty second address", "ip-address", "10.96.0.2,", func(f *Flags) { f.IPAddress = "10.96.0.2," }},
		{"empty address between two", "ip-address", "10.96.0.2,,100.64.0.1", func(f *Flags) { f.IPAddress = "10.96.0.2,,100.64.0.1" }},
		{"bad address in a list", "ip-address", "10.96.0.2,100.64.0", func(f *Flags) { f.IPAddress = "10.96.0.2,100.64.0" }},
		{"space after comma", "ip-address", "10.96.0.2, fd00::2", func(f *Flags) { f.IPAddress = "10.96.0.2, fd00::2" }},
		{"IPv4-mapped IPv6", "ip-address", "::ffff:10.96.0.2", func(f *Flags) { f.IPAddress = "::ffff:10.96.0.2" }},
		{"multicast", "ip-address", "224.0.0.1", func(f *Flags) { f.IPAddress = "224.0.0.1" }},
		{"broadcast", "ip-address", "255.255.255.255", func(f *Flags) { f.IPAddress = "255.255.255.255" }},
		{"address with newline", "ip-address", "10.96.0.2\n", func(f *Flags) { f.IPAddress = "10.96.0.2\n" }},
		{"port 0", "port", "0", func(f *Flags) { f.Port = "0" }},
		{"port too large", "port", "65536", func(f *Flags) { f.Port = "65536" }},
		{"negative port", "port", "-1", func(f *Flags) { f.Port = "-1" }},
		{"port name", "port", "https", func(f *Flags) { f.Port = "https" }},
		{"empty port", "port", "", func(f *Flags) { f.Port = "" }},
		{"port with newline", "port", "443\n", func(f *Flags) { f.Port = "443\n" }},
		{"empty interface", "interface", "", func(f *Flags) { f.Interface = "" }},
		{"16-byte interface", "interface", "apiserver-proxy0", func(f *Flags) { f.Interface = "apiserver-proxy0" }},
		{"interface with slash", "interface", "eth/0", func(f *Flags) { f.Interface = "eth/0" }},
		{"interface with space", "interface", "eth 0", func(f *Flags) { f.Interface = "eth 0" }},
		{"interface with tab", "interface", "eth\t0", func(f *Flags) { f.Interface = "eth\t0" }},
		{"interface with colon", "interface", "lo:1", func(f *Flags) { f.Interface = "lo:1" }},
		{"interface with control character", "interface", "eth\x010", func(f *Flags) { f.Interface = "eth\x010" }},
		{"interface with newline", "interface", "lo\n", func(f *Flags) { f.Interface = "lo\n" }},
		{"interface dot", "interface", ".", func(f *Flags) { f.Interface = "." }},
		{"zero sync interval", "sync-interval", "0s", func(f *Flags) { f.SyncInterval = 0 }},
		{"unknown backend", "iptables-backend", "iptables", func(f *Flags) { f.Backend = "iptables" }},
		{"iptables timeout within the lock wait", "iptables-timeout", "5s", func(f *Flags) { f.IPTablesTimeout = 5 * time.Second }},
		{"zero iptables timeout", "iptables-timeout", "0s", func(f *Flags) { f.IPTablesTimeout = 0 }},
		{"negative sync interval", "sync-interval", "-1s", func(f *Flags) { f.SyncInterval = -time.Second }},
		{"sync interval of a millisecond", "sync-interval", "1ms", func(f *Flags) { f.SyncInterval = time.Millisecond }},
		{"sync interval just below the floor", "sync-interval", "999ms", func(f *Flags) { f.SyncInterval = MinSyncInterval - time.Millisecond }},
		{"zero sync interval, floor lifted", "sync-interval", "0s", func(f *Flags) { f.SyncInterval, f.UnsafeShortSyncInterval = 0, true }},
		{"negative sync interval, floor lifted", "sync-interval", "-10ms", func(f *Flags) { f.SyncInterval, f.UnsafeShortSyncInterval = -10*time.Millisecond, true }},
		{"health address without port", "health-probe-bind-address", "127.0.0.1", func(f *Flags) { f.HealthProbeBindAddress = "127.0.0.1" }},
		{"health port alone", "health-probe-bind-address", "16911", func(f *Flags) { f.HealthProbeBindAddress = "16911" }},
		{"health port 0", "health-probe-bind-address", "127.0.0.1:0", func(f *Flags) { f.HealthProbeBindAddress = "127.0.0.1:0" }},
		{"health port too large", "health-probe-bind-address", ":65536", func(f *Flags) { f.HealthProbeBindAddress = ":65536" }},
		{"health port name", "health-probe-bind-address", "localhost:http", func(f *Flags) { f.HealthProbeBindAddress = "localhost:http" }},
		{"health hostname", "health-probe-bind-address", "node1:16911", func(f *Flags) { f.HealthProbeBindAddress = "node1:16911" }},
		{"health IPv6 without brackets", "health-probe-bind-address", "::1:16911", func(f *Flags) { f.HealthProbeBindAddress = "::1:16911" }},
		{"health URL", "health-probe-bind-address", "http://127.0.0.1:16911", func(f *Flags) { f.HealthProbeBindAddress = "http://127.0.0.1:16911" }},
		{"metrics address without port", "metrics-bind-address", "0.0.0.0", func(f *Flags) { f.MetricsBindAddress = "0.0.0.0" }},
		{"metrics empty port", "metrics-bind-address", "127.0.0.1:", func(f *Flags) { f.MetricsBindAddress = "127.0.0.1:" }},
		{"metrics negative port", "metrics-bind-address", ":-1", func(f *Flags) { f.MetricsBindAddress = ":-1" }},
		{"metrics on the health port", "metrics-bind-address", ":16911", func(f *Flags) {
			f.HealthProbeBindAddress, f.MetricsBindAddress = "127.0.0.1:16911", ":16911"
		}},
		{"metrics on the health port of another host", "metrics-bind-address", "10.0.0.1:16911", func(f *Flags) {
			f.HealthProbeBindAddress, f.MetricsBindAddress = "127.0.0.1:16911", "10.0.0.1:16911"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := valid()
			tc.edit(&f)
			cfg, err := f.Validate()
			if err == nil {
				t.Fatalf("Validate succeeded with %+v", cfg)
			}
			var fe *FlagError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a *FlagError", err)
			}
			if fe.Flag != tc.flag || fe.Value != tc.value {
				t.Errorf("error names --%s=%q, want --%s=%q", fe.Flag, fe.Value, tc.flag, tc.value)
			}
			if msg := err.Error(); !strings.Contains(msg, "--"+tc.flag) || strings.ContainsAny(msg, "\n\r") {
				t.Errorf("message %q must name --%s and fit on one line", msg, tc.flag)
			}
		})
	}
}

// TestSyncIntervalFloor proves the floor's message: it names the flag, the
// value and the floor, and the hidden flag that lifts it is not in --help.
func TestSyncIntervalFloor(t *testing.T) {
	f := valid()
	f.SyncInterval = time.Millisecond
	_, err := f.Validate()
	if want := `invalid value "1ms" for --sync-interval: must be at least 1s (a minute is 1m)`; err == nil || err.Error() != want {
		t.Errorf("error %v, want %s", err, want)
	}
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	var parsed Flags
	parsed.AddFlags(fs)
	if usage := fs.FlagUsages(); strings.Contains(usage, unsafeShortSyncIntervalFlag) || !strings.Contains(usage, "at least 1s") {
		t.Errorf("--help must state the floor and hide --%s:\n%s", unsafeShortSyncIntervalFlag, usage)
	}
	if err := fs.Parse([]string{"--sync-interval", "20ms", "--" + unsafeShortSyncIntervalFlag}); err != nil {
		t.Fatal(err)
	}
	if !parsed.UnsafeShortSyncInterval || parsed.SyncInterval != 20*time.Millisecond {
		t.Errorf("parsed %+v, want a 20ms interval with the floor lifted", parsed)
	}
}
