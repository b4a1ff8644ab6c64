package main

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/kubeproxy"
)

// The node: a "node" namespace running the sidecar, with kube-proxy's
// DNAT of the `kubernetes` Service's ClusterIP to the proxy's address, an
// echo server (standing for haproxy) on both, and a filter INPUT policy of
// DROP that accepts only lo and what conntrack knows; a "pod" namespace
// joined to it by a veth. The sidecar intercepts the ClusterIP
// (`--ip-address=PROXY,CLUSTERIP --setup-iptables`), so every path is
// untracked and accepted by its rules.

const (
	proxyAddr   = "10.96.0.2"
	clusterIP   = "100.64.0.1"
	serviceCIDR = "100.64.0.0/16"
	port        = 443
	// controlPort is on the node's veth address, accepted by the node's
	// own firewall, tracked: nothing the sidecar does or undoes reaches
	// it, so a failure there is the machine stalling, not an outage.
	controlPort = 8080
	nodeVeth    = "192.0.2.1/24"
	podVeth     = "192.0.2.2/24"
	// Our chain in filter, and the jump to it from INPUT.
	ourInputChain = "APISERVER-PROXY-INPUT"
)

// baseRules are the node's own rules in INPUT, below its DROP policy:
// accept what conntrack knows and loopback, as distributions' firewalls
// do, and the control port.
var baseRules = [][]string{
	{"-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"},
	{"-A", "INPUT", "-i", "lo", "-j", "ACCEPT"},
	{"-A", "INPUT", "-p", "tcp", "-m", "tcp", "--dport", strconv.Itoa(controlPort), "-j", "ACCEPT"},
}

// node is one backend's node and pod namespaces, its clients and the
// sidecar running on it.
type node struct {
	h       *harness
	plan    plan
	bin     string
	backend string
	ns, pod *namespace
	// baseFilter is the node's filter table before the sidecar ran, as
	// iptables-save prints it: what a firewall reload restores.
	baseFilter string
	clients    *clients
	sidecar    *sidecar
	// writes are the writer storm's restores, start to end.
	writes []span
	// missingJumps counts the times deleteOurJump found no jump to delete.
	missingJumps int
	// changes counts the events `nft monitor` (nft backend only) and `ip
	// monitor address` printed: every change to the ruleset and to the
	// addresses, whoever made it.
	changes atomic.Int64
	log     func(string, ...any)
}

// program is the name of backend's program t for IPv4.
func (n *node) program(t backend.Tool) string {
	return backend.Binary(backend.Backend(n.backend), false, t)
}

func (n *node) ipt(ctx context.Context, args ...string) (string, error) {
	return n.h.Run(ctx, n.ns, "", n.program(backend.IPTables), args...)
}

// sidecarArgs is the daemon's command line on this backend.
func (n *node) sidecarArgs(cleanup bool) []string {
	args := []string{"--ip-address=" + proxyAddr + "," + clusterIP, "--setup-iptables", "--iptables-backend=" + n.backend, "-v=2"}
	if cleanup {
		args = append(args, "--cleanup")
	}
	return args
}

// faultCycle is the span disruptions fall at random points of.
const faultCycle = time.Second

// newNode builds backend's node, starts the sidecar and the clients, and
// returns once every path is reachable.
func (h *harness) newNode(ctx context.Context, p plan, bin, backendName string, log func(string, ...any)) (*node, error) {
	n := &node{h: h, plan: p, bin: bin, backend: backendName, log: log}
	var err error
	if n.ns, err = h.NewNamespace(ctx); err != nil {
		return nil, err
	}
	if n.pod, err = h.NewNamespace(ctx); err != nil {
		return nil, err
	}
	steps := [][]string{
		{"ip", "-n", n.ns.Name, "link", "add", "veth-node", "type", "veth", "peer", "name", "veth-pod", "netns", n.pod.Name},
		// IPv4 only: no link-local address appears on the veth a few
		// seconds later, which `ip monitor address` would count as a
		// change.
		{"ip", "-n", n.ns.Name, "link", "set", "veth-node", "addrgenmode", "none"},
		{"ip", "-n", n.pod.Name, "link", "set", "veth-pod", "addrgenmode", "none"},
		{"ip", "-n", n.ns.Name, "link", "set", "veth-node", "up"},
		{"ip", "-n", n.pod.Name, "link", "set", "veth-pod", "up"},
		{"ip", "-n", n.ns.Name, "addr", "add", nodeVeth, "dev", "veth-node"},
		{"ip", "-n", n.pod.Name, "addr", "add", podVeth, "dev", "veth-pod"},
		{"ip", "-n", n.pod.Name, "route", "add", "default", "via", strings.Split(nodeVeth, "/")[0]},
		// The Service range is routed off the node, as a node's default
		// route does: a connection to a ClusterIP needs a route before
		// nat OUTPUT can rewrite it.
		{"ip", "-n", n.ns.Name, "route", "add", serviceCIDR, "via", strings.Split(podVeth, "/")[0]},
	}
	for _, s := range steps {
		if err := nsrun.RunHost(ctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	for _, rule := range append([][]string{{"-P", "INPUT", "DROP"}}, baseRules...) {
		if _, err := n.ipt(ctx, rule...); err != nil {
			return nil, err
		}
	}
	if n.baseFilter, err = n.h.Run(ctx, n.ns, "", n.program(backend.Save), "-t", "filter"); err != nil {
		return nil, err
	}
	if _, err := n.h.Run(ctx, n.ns, kubeproxy.KubernetesService(netip.AddrPortFrom(netip.MustParseAddr(clusterIP), port), netip.AddrPortFrom(netip.MustParseAddr(proxyAddr), port)), n.program(backend.Restore), "--noflush"); err != nil {
		return nil, fmt.Errorf("loading kube-proxy's rules: %w", err)
	}
	proxy := netip.AddrPortFrom(netip.MustParseAddr(proxyAddr), port)
	cip := netip.AddrPortFrom(netip.MustParseAddr(clusterIP), port)
	control := netip.AddrPortFrom(netip.MustParseAddr(strings.Split(nodeVeth, "/")[0]), controlPort)
	if err := h.echoServer(ctx, n.ns, proxy, cip, control); err != nil {
		return nil, err
	}
	if n.sidecar, err = n.startSidecar(ctx, false); err != nil {
		return nil, err
	}
	monitors := [][]string{{"ip", "monitor", "address"}}
	if backendName == "nft" {
		monitors = append(monitors, []string{"nft", "monitor"})
	}
	for _, m := range monitors {
		if err := n.monitor(ctx, m[0], m[1:]...); err != nil {
			return nil, err
		}
	}
	paths := []path{
		{Name: "pod → proxy", from: n.pod, target: proxy},
		{Name: "pod → ClusterIP", from: n.pod, target: cip},
		{Name: "node → proxy", from: n.ns, target: proxy},
		{Name: "node → ClusterIP", from: n.ns, target: cip},
		{Name: "control", from: n.pod, target: control, control: true},
	}
	if n.clients, err = startClients(paths, p.Interval, p.Timeout); err != nil {
		return nil, err
	}
	if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
		return nil, err
	}
	return n, nil
}

// monitor runs a program that prints a line per change in the node, and
// counts the lines in n.changes. `ip monitor address` prints two lines for
// each address: a change is any line that does not start with a space.
func (n *node) monitor(ctx context.Context, name string, args ...string) error {
	c := n.h.Command(ctx, name, args...)
	out, err := c.StdoutPipe()
	if err != nil {
		return err
	}
	if err := n.h.Start(n.ns, c); err != nil {
		return err
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if line := sc.Text(); line != "" && line[0] != ' ' && line[0] != '\t' {
				n.changes.Add(1)
			}
		}
	}()
	return nil
}

// recoverTimeout bounds the wait for every path to work again after a
// disruption: far above any gap measured, far below the run's bound.
const recoverTimeout = 15 * time.Second

func (n *node) startSidecar(ctx context.Context, cleanup bool) (*sidecar, error) {
	s, err := n.h.startSidecar(ctx, n.ns, n.bin, n.sidecarArgs(cleanup)...)
	if err != nil {
		return nil, err
	}
	if err := s.waitReady(ctx, recoverTimeout); err != nil {
		_ = s.stop(syscall.SIGKILL)
		return nil, err
	}
	return s, nil
}

// close stops the clients and the sidecar; the namespaces go at the end
// of the run.
func (n *node) close() {
	if n.clients != nil {
		n.clients.close()
	}
	if n.sidecar != nil {
		_ = n.sidecar.stop(syscall.SIGKILL)
	}
}

func (n *node) pathNames() []string {
	var names []string
	for _, pc := range n.clients.paths {
		names = append(names, pc.Name)
	}
	return names
}

// kind is what a scenario measures against.
type kind int

const (
	lifecycle   kind = iota // target: 0 failed connections
	expectedGap             // no target: a gap is expected and measured
	external                // target: the longest gap
	storm                   // target: 0 failed connections
)

// scenario is one disruption, repeated Events times within one window.
type scenario struct {
	Name   string
	Kind   kind
	Events int
	// flushesControl is set where the disruption removes, for a moment,
	// the node's own rule the control goes through.
	flushesControl bool
	// run disrupts the node events times; the clients measure meanwhile.
	run func(ctx context.Context, n *node, events int) (detail string, err error)
}

// scenarios is the run's list, in order; plan p sets the repetitions.
func scenarios(p plan) []scenario {
	return []scenario{
		{Name: "SIGKILL, restart at once", Kind: lifecycle, Events: p.Kills, run: killRestart},
		{Name: "rolling update (no `--cleanup`)", Kind: lifecycle, Events: p.Updates, run: func(ctx context.Context, n *node, events int) (string, error) {
			return rollingUpdate(ctx, n, events, false)
		}},
		{Name: "rolling update, old one with `--cleanup`", Kind: expectedGap, Events: p.Updates, run: func(ctx context.Context, n *node, events int) (string, error) {
			return rollingUpdate(ctx, n, events, true)
		}},
		{Name: "our filter chain flushed", Kind: external, Events: p.Faults, run: fault(flushOurChain)},
		{Name: "our jump from INPUT deleted", Kind: external, Events: p.Faults, run: func(ctx context.Context, n *node, events int) (string, error) {
			before := n.missingJumps
			detail, err := fault(deleteOurJump)(ctx, n, events)
			if m := n.missingJumps - before; m > 0 {
				detail = fmt.Sprintf("%d times the jump was found missing when it came to be deleted, every path reachable a moment before: the event was made again once they were", m)
			}
			return detail, err
		}},
		{Name: "`iptables -F INPUT`", Kind: external, Events: p.Faults, run: fault(flushInput), flushesControl: true},
		{Name: "filter table restored without `--noflush`", Kind: external, Events: p.Faults, run: fault(restoreFilter)},
		{Name: "both addresses deleted", Kind: external, Events: p.Faults, run: fault(deleteAddresses)},
		{Name: "kube-proxy-shaped writer storm", Kind: storm, Events: 1, run: writerStorm},
	}
}

// killRestart SIGKILLs the sidecar at a random point of its life, from its
// start-up to a second later, and starts a new one at once, events times.
func killRestart(ctx context.Context, n *node, events int) (string, error) {
	var early int
	for range events {
		delay := time.Duration(rand.Int64N(int64(time.Second)))
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return "", ctx.Err()
		case <-t.C:
		}
		select {
		case <-n.sidecar.ready:
		default:
			early++ // killed before its first sync finished
		}
		if err := n.sidecar.stop(syscall.SIGKILL); err != nil {
			return "", err
		}
		s, err := n.h.startSidecar(ctx, n.ns, n.bin, n.sidecarArgs(false)...)
		if err != nil {
			return "", err
		}
		n.sidecar = s
	}
	if err := n.sidecar.waitReady(ctx, recoverTimeout); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d of %d kills before the first sync had finished", early, events), nil
}

// rollingUpdate starts a second instance next to the running one, waits
// until it is ready, then stops the first with SIGTERM, events times. With
// cleanup, the instance stopped each time runs with --cleanup, and the
// clients must recover before the next update. (The running instance is
// first replaced, outside the count, by one with --cleanup, and the last
// update brings back one without, as the next scenario expects.)
func rollingUpdate(ctx context.Context, n *node, events int, cleanup bool) (string, error) {
	if cleanup {
		if err := replace(ctx, n, true); err != nil {
			return "", err
		}
		if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
			return "", err
		}
	}
	for i := range events {
		if err := replace(ctx, n, cleanup && i < events-1); err != nil {
			return "", err
		}
		if cleanup {
			if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
				return "", err
			}
			pause(ctx, faultCycle)
		}
	}
	return "", nil
}

// replace starts a new instance (with --cleanup if cleanup), waits for it
// to be ready, and stops the running one with SIGTERM.
func replace(ctx context.Context, n *node, cleanup bool) error {
	s, err := n.startSidecar(ctx, cleanup)
	if err != nil {
		return err
	}
	old := n.sidecar
	n.sidecar = s
	return old.stop(syscall.SIGTERM)
}

// pause waits up to d, a random share of it: disruptions then fall at
// random points of the sidecar's work (syncs, polls, debounces).
func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(time.Duration(rand.Int64N(int64(d))))
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// fault repeats do events times, each time waiting for every path to work
// again before the next, at a random point of a faultCycle.
func fault(do func(ctx context.Context, n *node) error) func(ctx context.Context, n *node, events int) (string, error) {
	return func(ctx context.Context, n *node, events int) (string, error) {
		for range events {
			pause(ctx, faultCycle)
			if err := do(ctx, n); err != nil {
				return "", err
			}
			// Attempts that completed while the fault was being made are
			// no sign of recovery: count from the moment it is in place.
			if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
				return "", err
			}
		}
		return "", nil
	}
}

func flushOurChain(ctx context.Context, n *node) error {
	_, err := n.ipt(ctx, "-t", "filter", "-F", ourInputChain)
	return err
}

// deleteOurJump deletes the jump to our chain from INPUT, as listed. A
// jump found missing, with every path reachable a moment before, is an
// anomaly of its own: it is counted, and the event made again once the
// paths are reachable.
func deleteOurJump(ctx context.Context, n *node) error {
	for try := 0; ; try++ {
		listing, err := n.ipt(ctx, "-t", "filter", "-S", "INPUT")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(listing, "\n") {
			f := strings.Fields(line)
			if len(f) > 2 && f[0] == "-A" && f[len(f)-2] == "-j" && f[len(f)-1] == ourInputChain {
				f[0] = "-D"
				_, err := n.ipt(ctx, append([]string{"-t", "filter"}, f...)...)
				return err
			}
		}
		n.missingJumps++
		if try == 2 {
			return fmt.Errorf("no jump to %s in INPUT to delete, three times:\n%s\nthe sidecar's log ends:\n%s", ourInputChain, listing, n.sidecar.lastLog())
		}
		if err := n.clients.waitHealthy(ctx, time.Now(), recoverTimeout); err != nil {
			return err
		}
	}
}

// flushInput flushes INPUT whole, then puts the node's own rules back,
// as its firewall would: clients on the node need its accept of lo
// whatever the sidecar does (the replies to them are untracked), so
// without them the node's paths would measure the node's firewall.
func flushInput(ctx context.Context, n *node) error {
	if _, err := n.ipt(ctx, "-F", "INPUT"); err != nil {
		return err
	}
	for _, rule := range baseRules {
		if _, err := n.ipt(ctx, rule...); err != nil {
			return err
		}
	}
	return nil
}

// restoreFilter replaces the filter table with the node's saved base
// rules, as a firewalld reload or netfilter-persistent does.
func restoreFilter(ctx context.Context, n *node) error {
	_, err := n.h.Run(ctx, n.ns, n.baseFilter, n.program(backend.Restore))
	return err
}

func deleteAddresses(ctx context.Context, n *node) error {
	for _, a := range []string{proxyAddr, clusterIP} {
		if _, err := n.h.Run(ctx, n.ns, "", "ip", "addr", "del", a+"/32", "dev", "lo"); err != nil {
			return err
		}
	}
	return nil
}

// Writer storm: a kube-proxy-shaped writer rewrites its own chains in nat
// and filter whole (10,000 rules in all), and replaces the rules it keeps
// in the built-in chains (some inserted at the top, some appended), in
// batches of iptables-restore --noflush, every stormPause.
const (
	stormBatches  = 4
	stormPerChain = 1250 // 2 tables x 4 batches x 1250 = 10,000 rules
	stormPause    = 100 * time.Millisecond
)

func writerStorm(ctx context.Context, n *node, _ int) (string, error) {
	end := time.Now().Add(n.plan.Storm)
	rounds := 0
	var took time.Duration
	for time.Now().Before(end) {
		started := time.Now()
		for b := range stormBatches {
			from := time.Now()
			if _, err := n.h.Run(ctx, n.ns, stormBatch(rounds, b), n.program(backend.Restore), "--noflush", "--wait=60"); err != nil {
				return "", fmt.Errorf("the writer's round %d: %w", rounds, err)
			}
			n.writes = append(n.writes, span{from, time.Now()})
		}
		took += time.Since(started)
		rounds++
		pause := time.NewTimer(stormPause)
		select {
		case <-ctx.Done():
			pause.Stop()
			return "", ctx.Err()
		case <-pause.C:
		}
	}
	return fmt.Sprintf("%d rounds of 10,000 rules, %s each on average", rounds, (took / time.Duration(max(rounds, 1))).Round(time.Millisecond)), nil
}

// stormBatch is batch b of round: one chain per table rewritten; the first
// batch also replaces the writer's rules in the built-in chains.
func stormBatch(round, b int) string {
	var p strings.Builder
	for _, table := range []string{"nat", "filter"} {
		verdict, chains := "ACCEPT", []string{"INPUT", "OUTPUT"}
		if table == "nat" {
			verdict, chains = "RETURN", []string{"PREROUTING", "OUTPUT"}
		}
		chain := fmt.Sprintf("FOREIGN-%s-%d", strings.ToUpper(table), b)
		fmt.Fprintf(&p, "*%s\n:%s - [0:0]\n", table, chain)
		for i := range stormPerChain {
			fmt.Fprintf(&p, "-A %s -d 198.18.%d.%d/32 -p tcp -m tcp --dport %d -j %s\n", chain, b*5+i/250, i%250+1, 1024+round%60000, verdict)
		}
		if b == 0 {
			builtin := func(r int) (top, bottom []string) {
				src := fmt.Sprintf("198.51.100.%d/32", r%250+1)
				for _, c := range chains {
					for i := range 2 {
						top = append(top, fmt.Sprintf("%s -s %s -p tcp -m tcp --dport %d -j %s", c, src, 2001+i, verdict))
						bottom = append(bottom, fmt.Sprintf("%s -s %s -p tcp -m tcp --dport %d -j %s", c, src, 3001+i, verdict))
					}
				}
				return top, bottom
			}
			if round > 0 {
				top, bottom := builtin(round - 1)
				for _, r := range append(top, bottom...) {
					p.WriteString("-D " + r + "\n")
				}
			}
			top, bottom := builtin(round)
			for _, r := range top {
				p.WriteString("-I " + r + "\n")
			}
			for _, r := range bottom {
				p.WriteString("-A " + r + "\n")
			}
		}
		if round == 0 {
			fmt.Fprintf(&p, "-A %s -j %s\n", chains[0], chain)
		}
		p.WriteString("COMMIT\n")
	}
	return p.String()
}
