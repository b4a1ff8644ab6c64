// Package config defines the sidecar's command-line flags and turns their
// values into a validated Config. Validation happens once, before anything
// touches the machine; every later step works with typed values only.
package config

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/spf13/pflag"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// Flags holds the command-line values as given, before validation.
type Flags struct {
	IPAddress     string
	Port          string
	Interface     string
	SyncInterval  time.Duration
	SetupIPTables bool
	Backend       string
	// IPTablesTimeout bounds each iptables program.
	IPTablesTimeout time.Duration
	Cleanup         bool
	Daemon          bool
	DryRun          bool
	// HealthProbeBindAddress and MetricsBindAddress are host:port, or ""
	// or "0" for off.
	HealthProbeBindAddress string
	MetricsBindAddress     string

	// UnsafeShortSyncInterval lifts the MinSyncInterval floor, for tests
	// that run the daemon at intervals of milliseconds.
	UnsafeShortSyncInterval bool
}

// AddFlags registers the sidecar's own flags on fs with their defaults.
// Names, defaults and meanings are those of the original sidecar; --dry-run,
// --iptables-backend, --iptables-timeout and the two bind addresses (named
// as controller-runtime names them) are new.
func (f *Flags) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&f.IPAddress, "ip-address", "", "ip-address on which the proxy is listening: one address, or up to 8 separated by commas (IPv4 and IPv6 in any mix), such as the proxy's own address followed by the ClusterIP of the kubernetes Service to intercept.")
	fs.StringVar(&f.Port, "port", "443", "[optional] port on which the proxy is listening.")
	fs.StringVar(&f.Interface, "interface", "lo", "[optional] name of the interface to add address to.")
	fs.DurationVar(&f.SyncInterval, "sync-interval", time.Minute, "[optional] interval to check for iptables rules; at least 1s.")
	fs.BoolVar(&f.UnsafeShortSyncInterval, unsafeShortSyncIntervalFlag, false, "[unsafe: for tests] accept a --sync-interval below 1s.")
	_ = fs.MarkHidden(unsafeShortSyncIntervalFlag) // the flag exists: MarkHidden cannot fail
	fs.BoolVar(&f.SetupIPTables, "setup-iptables", false, "[optional] indicates whether iptables rules should be setup.")
	fs.StringVar(&f.Backend, "iptables-backend", "auto", "[optional] iptables backend the rules are written with: auto (detect the one the node's kube-proxy and kubelet use), nft or legacy.")
	fs.DurationVar(&f.IPTablesTimeout, "iptables-timeout", 30*time.Second, "[optional] how long one iptables program may run before it is killed and the sync retried; more than the 5s a write waits for the xtables lock.")
	fs.BoolVar(&f.Cleanup, "cleanup", false, "[optional] indicates whether created interface and iptables should be removed on exit.")
	fs.BoolVar(&f.Daemon, "daemon", true, "[optional] indicates if the sidecar should run as a daemon")
	fs.BoolVar(&f.DryRun, "dry-run", false, "[optional] validate the flags, print the iptables-restore input that would be loaded on a node where none of it exists yet, and exit without touching the machine.")
	fs.StringVar(&f.HealthProbeBindAddress, "health-probe-bind-address", "", `[optional] host:port to serve the /healthz and /readyz probes on in daemon mode (":16911" for every address); empty or "0" serves none.`)
	fs.StringVar(&f.MetricsBindAddress, "metrics-bind-address", "", `[optional] host:port to serve Prometheus metrics on, at /metrics, in daemon mode (":16910" for every address); empty or "0" serves none.`)
}

// Config is the validated configuration.
type Config struct {
	// Addrs holds one to render.MaxAddresses distinct addresses: the IPv4
	// ones first, then the IPv6 ones, each in the order given.
	Addrs         []netip.Addr
	Port          uint16
	Interface     string
	SyncInterval  time.Duration
	SetupIPTables bool
	Backend       backend.Backend
	// IPTablesTimeout bounds each iptables program.
	IPTablesTimeout time.Duration
	Cleanup         bool
	Daemon          bool
	DryRun          bool
	// HealthProbeBindAddress is where /healthz and /readyz are served, as
	// host:port; "" when they are not.
	HealthProbeBindAddress string
	// MetricsBindAddress is where /metrics is served, as host:port; ""
	// when it is not.
	MetricsBindAddress string
}

// MinSyncInterval is the shortest --sync-interval. Below it the interval is
// most likely a typo (1ms for 1m), and costly: at 1ms the daemon takes a
// fifth of a core with nft and a whole core with legacy (two
// iptables-legacy-save per sync), and logs 130 KB a second at -v 2. At the
// floor even a legacy sync of 50,000 filter rules (220 ms of CPU) costs at
// most a fifth of a core. See README.md, Validation.
const MinSyncInterval = time.Second

// unsafeShortSyncIntervalFlag lifts the MinSyncInterval floor. It is hidden
// from --help: only tests need it.
const unsafeShortSyncIntervalFlag = "unsafe-short-sync-interval"

// MinIPTablesTimeout is the shortest --iptables-timeout: a write waits up
// to backend.LockWait for the xtables lock (iptables-restore --wait), and a
// bound at or below that would kill it while it waits.
const MinIPTablesTimeout = backend.LockWait + time.Second

// FlagError reports a flag whose value was refused.
type FlagError struct {
	Flag   string
	Value  string
	Reason string
}

func (e *FlagError) Error() string {
	return fmt.Sprintf("invalid value %q for --%s: %s", e.Value, e.Flag, e.Reason)
}

// Validate checks every value and returns the typed configuration, or a
// *FlagError naming the first flag that was refused.
func (f Flags) Validate() (Config, error) {
	addrs, err := ParseAddresses(f.IPAddress)
	if err != nil {
		return Config{}, flagError("ip-address", f.IPAddress, err)
	}
	port, err := ParsePort(f.Port)
	if err != nil {
		return Config{}, flagError("port", f.Port, err)
	}
	if err := CheckInterfaceName(f.Interface); err != nil {
		return Config{}, flagError("interface", f.Interface, err)
	}
	switch {
	case f.SyncInterval <= 0:
		return Config{}, flagError("sync-interval", f.SyncInterval.String(), errors.New("must be positive"))
	case f.SyncInterval < MinSyncInterval && !f.UnsafeShortSyncInterval:
		return Config{}, flagError("sync-interval", f.SyncInterval.String(), fmt.Errorf("must be at least %s (a minute is 1m)", MinSyncInterval))
	}
	b, err := backend.Parse(f.Backend)
	if err != nil {
		return Config{}, flagError("iptables-backend", f.Backend, err)
	}
	if f.IPTablesTimeout < MinIPTablesTimeout {
		return Config{}, flagError("iptables-timeout", f.IPTablesTimeout.String(), fmt.Errorf("must be at least %s: a write waits up to %s for the xtables lock", MinIPTablesTimeout, backend.LockWait))
	}
	health, err := ParseBindAddress(f.HealthProbeBindAddress)
	if err != nil {
		return Config{}, flagError("health-probe-bind-address", f.HealthProbeBindAddress, err)
	}
	metrics, err := ParseBindAddress(f.MetricsBindAddress)
	if err != nil {
		return Config{}, flagError("metrics-bind-address", f.MetricsBindAddress, err)
	}
	if health != "" && metrics != "" && bindPort(health) == bindPort(metrics) {
		// Both listeners set SO_REUSEPORT: the kernel would split the
		// connections between them instead of refusing the second.
		return Config{}, flagError("metrics-bind-address", f.MetricsBindAddress, errors.New("must not use the port of --health-probe-bind-address"))
	}
	return Config{
		Addrs:           addrs,
		Port:            port,
		Interface:       f.Interface,
		SyncInterval:    f.SyncInterval,
		SetupIPTables:   f.SetupIPTables,
		Backend:         b,
		IPTablesTimeout: f.IPTablesTimeout,
		Cleanup:         f.Cleanup,
		Daemon:          f.Daemon,
		DryRun:          f.DryRun,

		HealthProbeBindAddress: health,
		MetricsBindAddress:     metrics,
	}, nil
}

func flagError(flag, value string, err error) *FlagError {
	return &FlagError{Flag: flag, Value: value, Reason: err.Error()}
}

// ParseAddresses parses a comma-separated list of one to
// render.MaxAddresses addresses, IPv4 and IPv6 in any mix, as node-local-dns
// takes its -localip: the proxy's own address and the Service ClusterIPs it
// intercepts. It refuses prefixes, zones, unspecified, multicast and
// IPv4-mapped IPv6 addresses, since none of them can be a proxy's listening
// address on a node, and an address listed twice. The result holds the
// IPv4 addresses first, then the IPv6 ones, each in the order given.
func ParseAddresses(s string) ([]netip.Addr, error) {
	if s == "" {
		return nil, errors.New("an address is required")
	}
	parts := strings.Split(s, ",")
	if len(parts) > render.MaxAddresses {
		return nil, fmt.Errorf("%d addresses; at most %d", len(parts), render.MaxAddresses)
	}
	addrs := make([]netip.Addr, 0, len(parts))
	for _, p := range parts {
		if p == "" {
			return nil, errors.New("an empty entry in the list; separate addresses by one comma, without spaces")
		}
		a, err := parseAddress(p)
		if err != nil {
			return nil, err
		}
		if slices.Contains(addrs, a) {
			return nil, fmt.Errorf("%s is listed twice", a)
		}
		addrs = append(addrs, a)
	}
	// IPv4 first: the order in which the families' rulesets are loaded.
	slices.SortStableFunc(addrs, func(a, b netip.Addr) int {
		return cmp.Compare(a.BitLen(), b.BitLen())
	})
	return addrs, nil
}

func parseAddress(s string) (netip.Addr, error) {
	if strings.Contains(s, "/") {
		return netip.Addr{}, fmt.Errorf("%q is a prefix; give the address alone", s)
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	switch {
	case a.Zone() != "":
		return netip.Addr{}, fmt.Errorf("%q has a zone; give an address without one", s)
	case a.Is4In6():
		return netip.Addr{}, fmt.Errorf("%q is an IPv4-mapped IPv6 address; give the IPv4 address", s)
	case a.IsUnspecified():
		return netip.Addr{}, fmt.Errorf("%q is the unspecified address", s)
	case a.IsMulticast():
		return netip.Addr{}, fmt.Errorf("%q is a multicast address", s)
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return netip.Addr{}, fmt.Errorf("%q is the broadcast address", s)
	}
	return a, nil
}

// ParsePort parses a TCP port number in 1..65535.
func ParsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, errors.New("must be a number in 1..65535")
	}
	return uint16(n), nil
}

// ParseBindAddress checks an address to listen on: "" or "0" (off, returned
// as ""), or host:port where host is empty (every address), "localhost" or
// an IP address, and port is a number in 1..65535.
func ParseBindAddress(s string) (string, error) {
	if s == "" || s == "0" {
		return "", nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", errors.New(`must be host:port (":16910" for every address), or empty or "0" for off`)
	}
	if host != "" && host != "localhost" {
		if _, err := netip.ParseAddr(host); err != nil {
			return "", fmt.Errorf("%q is neither an IP address nor localhost", host)
		}
	}
	if _, err := ParsePort(port); err != nil {
		return "", fmt.Errorf("port %q: %w", port, err)
	}
	return s, nil
}

// bindPort is the port of a host:port that ParseBindAddress accepted.
func bindPort(s string) uint16 {
	_, port, _ := net.SplitHostPort(s)
	n, _ := ParsePort(port)
	return n
}

// maxInterfaceName is the longest interface name Linux accepts (IFNAMSIZ-1).
const maxInterfaceName = 15

// CheckInterfaceName applies the kernel's rules for interface names
// (dev_valid_name): 1 to 15 bytes, not "." or "..", and no '/', ':',
// whitespace or control character.
func CheckInterfaceName(s string) error {
	switch {
	case s == "":
		return errors.New("must not be empty")
	case len(s) > maxInterfaceName:
		return fmt.Errorf("longer than %d bytes", maxInterfaceName)
	case s == "." || s == "..":
		return errors.New("is not a valid interface name")
	}
	for _, r := range s {
		switch {
		case r == '/' || r == ':':
			return fmt.Errorf("must not contain %q", r)
		case unicode.IsSpace(r) || unicode.IsControl(r) || r == unicode.ReplacementChar:
			return errors.New("must not contain whitespace or control characters")
		}
	}
	return nil
}
