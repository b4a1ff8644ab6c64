package e2e

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// dnatWarning is the start of the daemon's warning about the broken setup.
const dnatWarning = "WARNING: connections DNATed into our address fail"

// TestDNATWarning runs the daemon on a node whose kube-proxy DNATs the
// kubernetes ClusterIP to the proxy address, on both backends and both
// families: with --setup-iptables and only the proxy address, a pod's
// failed connection to the ClusterIP is named in a warning within one
// interval; with the ClusterIP intercepted, and without --setup-iptables
// (the DNATed connection tracked and answered), there is none.
func TestDNATWarning(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "conntrack")
	const interval = time.Second
	for _, backend := range backends {
		for _, fam := range families {
			t.Run(backend+"/"+fam.name, func(t *testing.T) {
				t.Parallel()
				proxy := netip.AddrPortFrom(fam.proxy, proxyPort)
				clusterIP := netip.AddrPortFrom(fam.clusterIP, proxyPort)
				for _, tc := range []struct {
					name  string
					args  []string
					works bool
				}{
					{"proxy address only: broken", []string{"--ip-address=" + fam.proxy.String(), "--setup-iptables"}, false},
					{"interception", []string{"--ip-address=" + fam.proxy.String() + "," + fam.clusterIP.String(), "--setup-iptables"}, true},
					{"no --setup-iptables", []string{"--ip-address=" + fam.proxy.String()}, true},
				} {
					t.Run(tc.name, func(t *testing.T) {
						t.Parallel()
						node, pod := newClientNode(t, backend, fam, iptablesMode)
						if !strings.Contains(strings.Join(tc.args, " "), "--setup-iptables") {
							// Nothing of ours accepts the port: the node must.
							node.Run(t, fam.iptables+"-"+backend, "-I", "INPUT", "-p", "tcp", "--dport", strconv.Itoa(proxyPort), "-j", "ACCEPT")
						}
						serveEcho(t, node, proxy)
						serveEcho(t, node, clusterIP)
						d := startDaemon(t, node, bin, append(tc.args, "--iptables-backend="+backend, "--sync-interval="+interval.String(), "-v=2")...)
						d.startupSynced(t)

						failedAt := time.Now()
						r := probe(t, pod, clusterIP, droppedDialTimeout)
						if works := r.err == nil; works != tc.works {
							t.Fatalf("pod -> %s: error %v, want it to work: %v", clusterIP, r.err, tc.works)
						}
						if !tc.works {
							eventually(t, "the warning", func() bool { return strings.Contains(d.log(), dnatWarning) }, within(2*interval))
							t.Logf("named %s after the failed connection", time.Since(failedAt).Round(time.Millisecond))
							var line string
							for _, l := range strings.Split(d.log(), "\n") {
								if strings.Contains(l, dnatWarning) {
									line = l
								}
							}
							for _, want := range []string{
								`originalDestination="` + clusterIP.String() + `"`,
								`dnatTo="` + proxy.String() + `"`,
								"--ip-address", "--setup-iptables",
							} {
								if !strings.Contains(line, want) {
									t.Errorf("the warning does not say %s:\n%s", want, line)
								}
							}
						} else {
							// Two interval syncs after the connection: one
							// check at least has looked at it.
							n := strings.Count(d.log(), `trigger="interval"`)
							eventually(t, "two interval syncs", func() bool { return strings.Count(d.log(), `trigger="interval"`) >= n+2 }, within(5*interval))
							if strings.Contains(d.log(), dnatWarning) {
								t.Errorf("a warning about a setup that works:\n%s", d.log())
							}
						}
						if code := d.stop(t); code != 0 {
							t.Errorf("the daemon exited %d", code)
						}
					})
				}
			})
		}
	}
}
