package apply

import (
	"bufio"
	"context"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	utilexec "k8s.io/utils/exec"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/backend"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nfnl"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
)

// nsExec runs every program inside a network namespace with `ip netns
// exec` and records what it ran.
type nsExec struct {
	utilexec.Interface
	ns *netnstest.NS

	mu  sync.Mutex
	ran []string
}

func newNSExec(ns *netnstest.NS) *nsExec {
	return &nsExec{Interface: utilexec.New(), ns: ns}
}

func (e *nsExec) CommandContext(ctx context.Context, name string, args ...string) utilexec.Cmd {
	e.mu.Lock()
	e.ran = append(e.ran, strings.Join(append([]string{name}, args...), " "))
	e.mu.Unlock()
	return e.Interface.CommandContext(ctx, "ip", append([]string{"netns", "exec", e.ns.Name, name}, args...)...)
}

// takeRan returns and forgets the programs run so far.
func (e *nsExec) takeRan() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	ran := e.ran
	e.ran = nil
	return ran
}

// newNSRules returns Rules that run programs and read /proc inside ns.
func newNSRules(t *testing.T, ns *netnstest.NS, ex utilexec.Interface, b Backend, rs *render.Ruleset) *Rules {
	n := hostNode{exec: ex, nft: nfnl.Conn{NS: ns.NetNS(t)}, xt: newXtablesReader(ns.NetNS(t)), proc: func(name string) ([]byte, error) {
		out, err := ns.RunErr("cat", name)
		if err != nil && strings.Contains(err.Error(), "No such file") {
			return nil, fs.ErrNotExist
		}
		return []byte(out), err
	}}
	return rulesOn(n, b, rs, &Counts{})
}

type backendCase struct {
	backend Backend
	addr    string
}

func backendCases() []backendCase {
	var out []backendCase
	for _, b := range []Backend{BackendNFT, BackendLegacy} {
		for _, a := range []string{"10.96.0.2", "fd00::2"} {
			out = append(out, backendCase{b, a})
		}
	}
	return out
}

func (c backendCase) String() string { return fmt.Sprintf("%s/%s", c.backend, c.addr) }

// kernelRules is what `iptables-B -S` lists for our chains and the jumps
// to them, table by table, in the form render produces.
func kernelRules(t *testing.T, ns *netnstest.NS, b Backend, rs *render.Ruleset) []string {
	t.Helper()
	bin := program(b, rs.Family, backend.IPTables)
	var out []string
	for _, tb := range rs.Tables {
		for _, h := range hooks(tb) {
			for _, line := range strings.Split(ns.Run(t, bin, "-t", tb.Name, "-S", h), "\n") {
				if strings.Contains(line, render.ChainPrefix) {
					out = append(out, tb.Name+": "+line)
				}
			}
		}
		for _, c := range tb.Chains {
			listing, err := ns.RunErr(bin, "-t", tb.Name, "-S", c.Name)
			if err != nil {
				continue // missing chains show as missing lines
			}
			for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
				out = append(out, tb.Name+": "+line)
			}
		}
	}
	return out
}

// renderedRules is kernelRules for a node where exactly the ruleset is in
// place.
func renderedRules(rs *render.Ruleset) []string {
	var out []string
	for _, tb := range rs.Tables {
		for _, h := range hooks(tb) {
			for _, c := range tb.Chains {
				if c.Hook == h {
					out = append(out, tb.Name+": "+c.JumpRule())
				}
			}
		}
		for _, c := range tb.Chains {
			out = append(out, tb.Name+": -N "+c.Name)
			for _, r := range c.Rules {
				out = append(out, tb.Name+": "+r)
			}
		}
	}
	return out
}

func TestRulesNetns(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy", "nft")
	for _, tc := range backendCases() {
		t.Run(tc.String(), func(t *testing.T) {
			ns := netnstest.New(t)
			ex := newNSExec(ns)
			rs := ruleset(t, tc.addr)
			r := newNSRules(t, ns, ex, tc.backend, rs)
			ctx := context.Background()
			bin := program(tc.backend, rs.Family, backend.IPTables)

			// Fresh apply: exactly the rendered rules, which proves the
			// canonical form against this iptables.
			if _, err := r.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(renderedRules(rs), kernelRules(t, ns, tc.backend, rs)); diff != "" {
				t.Fatalf("after a fresh apply (-want +got):\n%s", diff)
			}
			ex.takeRan()

			// A converged sync writes nothing.
			quiet := watchWrites(t, ns, tc.backend)
			drifts, err := r.Sync(ctx)
			if err != nil || len(drifts) != 0 {
				t.Fatalf("converged sync: drifts %v, error %v", drifts, err)
			}
			for _, ran := range ex.takeRan() {
				if strings.Contains(ran, "-restore") {
					t.Errorf("converged sync ran %q", ran)
				}
			}
			quiet()

			// Each drift is repaired by the next sync.
			raw, filter := rs.Tables[0], rs.Tables[1]
			for _, d := range []struct {
				name string
				args []string
				// sameSize replaces a rule with one of the same size,
				// which leaves the legacy tables' info as it was.
				sameSize bool
			}{
				{"chain flushed", []string{"-t", "raw", "-F", raw.Chains[1].Name}, false},
				{"rule altered", []string{"-t", "filter", "-R", filter.Chains[0].Name, "1", "-d", prefix(rs), "-p", "tcp", "-m", "tcp", "--dport", "444", "-j", "ACCEPT"}, true},
				{"rule added to our chain", []string{"-t", "filter", "-A", filter.Chains[1].Name, "-j", "DROP"}, false},
				{"jump deleted", []string{"-t", "filter", "-D", "INPUT", "-j", filter.Chains[0].Name}, false},
				{"jump duplicated", []string{"-t", "raw", "-A", "PREROUTING", "-j", raw.Chains[0].Name}, false},
				{"jump altered", []string{"-t", "filter", "-R", "OUTPUT", "1", "-o", "lo", "-j", filter.Chains[1].Name}, true},
			} {
				ns.Run(t, bin, d.args...)
				if diff := cmp.Diff(renderedRules(rs), kernelRules(t, ns, tc.backend, rs)); diff == "" {
					t.Fatalf("%s: %s changed nothing", d.name, d.args)
				}
				if d.sameSize && tc.backend == BackendLegacy {
					// Unseen in the info: trusted until legacyTrust has
					// passed since the last read.
					if drifts, err := r.Sync(ctx); err != nil || len(drifts) != 0 {
						t.Fatalf("%s: a sync within legacyTrust read the rules: drifts %v, error %v", d.name, drifts, err)
					}
					r.verifiedAt = r.verifiedAt.Add(-legacyTrust)
				}
				drifts, err := r.Sync(ctx)
				if err != nil {
					t.Fatalf("%s: %v", d.name, err)
				}
				if len(drifts) == 0 {
					t.Errorf("%s: sync reported no drift", d.name)
				}
				if diff := cmp.Diff(renderedRules(rs), kernelRules(t, ns, tc.backend, rs)); diff != "" {
					t.Errorf("%s: not repaired (-want +got):\n%s", d.name, diff)
				}
			}

			// Cleanup removes all of ours and nothing else.
			if _, err := r.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			if got := kernelRules(t, ns, tc.backend, rs); len(got) != 0 {
				t.Errorf("after cleanup, still in the kernel: %q", got)
			}
			ex.takeRan()
			if _, err := r.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			for _, ran := range ex.takeRan() {
				if strings.Contains(ran, "-restore") {
					t.Errorf("cleanup with nothing to remove ran %q", ran)
				}
			}
		})
	}
}

// TestRulesNetnsForeignRulesUntouched loads 1,000 foreign rules, some in the
// very built-in chains we jump from, and proves that apply, a repair and
// cleanup leave every one of them byte-identical.
func TestRulesNetnsForeignRulesUntouched(t *testing.T) {
	netnstest.RequireBinaries(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	for _, tc := range backendCases() {
		t.Run(tc.String(), func(t *testing.T) {
			ns := netnstest.New(t)
			rs := ruleset(t, tc.addr)
			r := newNSRules(t, ns, newNSExec(ns), tc.backend, rs)
			ctx := context.Background()
			bin := program(tc.backend, rs.Family, backend.IPTables)

			restore := ns.Command(program(tc.backend, rs.Family, backend.Restore), "--noflush")
			restore.Stdin = strings.NewReader(foreignRules(rs.Family, 1000))
			if out, err := restore.CombinedOutput(); err != nil {
				t.Fatalf("loading foreign rules: %v: %s", err, out)
			}
			foreign := func() string {
				t.Helper()
				return foreignState(t, ns, program(tc.backend, rs.Family, backend.Save))
			}
			before := foreign()
			if n := strings.Count(before, "\n-A "); n != 1000 {
				t.Fatalf("%d foreign rules loaded, want 1000", n)
			}

			if _, err := r.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(before, foreign()); diff != "" {
				t.Errorf("apply changed foreign rules (-before +after):\n%s", diff)
			}
			ns.Run(t, bin, "-t", "filter", "-F", rs.Tables[1].Chains[0].Name)
			ns.Run(t, bin, "-t", "raw", "-D", "PREROUTING", "-j", rs.Tables[0].Chains[0].Name)
			if drifts, err := r.Sync(ctx); err != nil || len(drifts) == 0 {
				t.Fatalf("repair: drifts %v, error %v", drifts, err)
			}
			if diff := cmp.Diff(before, foreign()); diff != "" {
				t.Errorf("repair changed foreign rules (-before +after):\n%s", diff)
			}
			if _, err := r.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			after := foreign()
			if diff := cmp.Diff(before, after); diff != "" {
				t.Errorf("cleanup changed foreign rules (-before +after):\n%s", diff)
			}
			if strings.Contains(after, render.ChainPrefix) {
				t.Errorf("cleanup left rules of ours:\n%s", after)
			}
		})
	}
}

// foreignRules returns a restore payload of n rules that are not ours: a
// kube-proxy-like service chain in nat, and rules in the built-in chains of
// raw and filter that our jumps share.
func foreignRules(f render.Family, n int) string {
	net := func(i int) string {
		if f == render.IPv6 {
			return fmt.Sprintf("2001:db8:%x::%x/128", i/250, i%250+1)
		}
		return fmt.Sprintf("198.18.%d.%d/32", i/250, i%250+1)
	}
	var b strings.Builder
	inHooks := n / 10 // in each of raw PREROUTING, filter INPUT and filter OUTPUT
	b.WriteString("*raw\n")
	for i := range inHooks {
		fmt.Fprintf(&b, "-A PREROUTING -s %s -p udp -m udp --dport 53 -j CT --notrack\n", net(i))
	}
	b.WriteString("COMMIT\n*filter\n:KUBE-FIREWALL - [0:0]\n")
	for i := range inHooks {
		fmt.Fprintf(&b, "-A INPUT -s %s -p tcp -m tcp --dport 10250 -j ACCEPT\n", net(i))
		fmt.Fprintf(&b, "-A OUTPUT -d %s -p tcp -m tcp --sport 10250 -j ACCEPT\n", net(i))
	}
	b.WriteString("-A INPUT -j KUBE-FIREWALL\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n")
	for i := range n - 3*inHooks - 1 {
		fmt.Fprintf(&b, "-A KUBE-SERVICES -d %s -p tcp -m comment --comment \"default/svc-%d:https\" -m tcp --dport 443 -j DNAT --to-destination %s\n",
			net(i), i, strings.Split(net(i+1), "/")[0])
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// foreignState is iptables-save without our lines, comments and counters.
func foreignState(t *testing.T, ns *netnstest.NS, save string) string {
	t.Helper()
	var b strings.Builder
	for _, line := range strings.Split(ns.Run(t, save), "\n") {
		switch {
		case strings.HasPrefix(line, "#"), strings.Contains(line, render.ChainPrefix):
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line, " ")
			b.WriteString(name + "\n") // policy kept, counters dropped below
			if f := strings.Fields(line); len(f) > 1 {
				b.WriteString("  policy " + f[1] + "\n")
			}
		default:
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func prefix(rs *render.Ruleset) string {
	f := strings.Fields(rs.Tables[0].Chains[0].Rules[0])
	return f[slices.Index(f, "-d")+1]
}

// watchWrites starts watching the namespace's ruleset for writes and returns
// a function that fails the test if any write happened since. With nft it
// runs `nft monitor` and brackets the interval with sentinel tables, so no
// sleep is needed to know the monitor has seen everything. The legacy
// backend has no change events; there it compares iptables-legacy-save
// output with counters.
func watchWrites(t *testing.T, ns *netnstest.NS, b Backend) (assertQuiet func()) {
	t.Helper()
	if b == BackendLegacy {
		before := ns.Run(t, "iptables-legacy-save") + ns.Run(t, "ip6tables-legacy-save")
		return func() {
			t.Helper()
			after := ns.Run(t, "iptables-legacy-save") + ns.Run(t, "ip6tables-legacy-save")
			strip := func(s string) string {
				var keep []string
				for _, l := range strings.Split(s, "\n") {
					if !strings.HasPrefix(l, "#") {
						keep = append(keep, l)
					}
				}
				return strings.Join(keep, "\n")
			}
			if diff := cmp.Diff(strip(before), strip(after)); diff != "" {
				t.Errorf("legacy tables changed (-before +after):\n%s", diff)
			}
		}
	}
	cmd := ns.Command("nft", "monitor")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	lines := make(chan string, 1024)
	go func() {
		s := bufio.NewScanner(stdout)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
	}()
	// waitFor adds sentinel tables (a new one each poll, since re-adding an
	// existing table is no event) until the monitor shows one, and returns
	// the other lines it showed before.
	n := 0
	waitFor := func(sentinel string) []string {
		t.Helper()
		var seen []string
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			n++
			ns.Run(t, "nft", "add", "table", "inet", fmt.Sprintf("%s_%d", sentinel, n))
			poll := time.After(100 * time.Millisecond)
		read:
			for {
				select {
				case l, ok := <-lines:
					if !ok {
						t.Fatal("nft monitor ended")
					}
					if strings.Contains(l, sentinel) {
						return seen
					}
					seen = append(seen, l)
				case <-poll:
					break read
				}
			}
		}
		t.Fatalf("nft monitor never showed %s", sentinel)
		return nil
	}
	waitFor("apsc_sentinel_a")
	drain := func() {
		for {
			select {
			case l := <-lines:
				if !sentinelEvent(l) {
					t.Errorf("unexpected nft event before the watched interval: %s", l)
				}
			default:
				return
			}
		}
	}
	drain()
	return func() {
		t.Helper()
		for _, l := range waitFor("apsc_sentinel_b") {
			if !sentinelEvent(l) {
				t.Errorf("nft event during a converged sync: %s", l)
			}
		}
	}
}

// sentinelEvent reports whether an nft monitor line is about the sentinel
// tables: their addition, or the generation change the nft tool made.
func sentinelEvent(line string) bool {
	return strings.Contains(line, "apsc_sentinel") ||
		strings.HasPrefix(line, "# new generation") && strings.HasSuffix(line, "(nft)")
}
