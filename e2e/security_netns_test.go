package e2e

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/netnstest"
)

// iptablesPrograms are the programs of both backends and both families
// that the sidecar may run.
var iptablesPrograms = func() []string {
	var out []string
	for _, fam := range []string{"iptables", "ip6tables"} {
		for _, b := range backends {
			for _, suffix := range []string{"", "-save", "-restore"} {
				out = append(out, fam+"-"+b+suffix)
			}
		}
	}
	return out
}()

// withCaps returns the setpriv arguments that run bin with args holding
// only caps (names as setpriv spells them: "net_admin"), and able to pass
// no others on: the bounding set limits what a root process gains at each
// exec, so every program the sidecar runs holds the same capabilities;
// inheritable and ambient keep them across exec.
func withCaps(caps []string, bin string, args ...string) []string {
	set := "-all"
	for _, c := range caps {
		set += ",+" + c
	}
	return append([]string{"--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set, "--", bin}, args...)
}

// netAdminAndRaw is CapEff, as /proc/PID/status shows it, for exactly
// CAP_NET_ADMIN (12) and CAP_NET_RAW (13).
const netAdminAndRaw = "0000000000003000"

// procCaps returns the Cap* lines of /proc/PID/status by field name.
func procCaps(t *testing.T, pid int) map[string]string {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	caps := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.HasPrefix(k, "Cap") {
			caps[k] = strings.TrimSpace(v)
		}
	}
	return caps
}

// capShims writes, for every iptables program, a shim that appends the
// capability sets of the process about to run it to the returned log, then
// runs the real program. With the shims' directory first in PATH, the log
// shows what each program the sidecar starts holds.
func capShims(t *testing.T) (sh *shims, logFile string) {
	t.Helper()
	sh, logFile = newShims(t), filepath.Join(t.TempDir(), "caps")
	for _, prog := range iptablesPrograms {
		if _, err := exec.LookPath(prog); err != nil {
			continue
		}
		sh.write(t, prog, fmt.Sprintf(`caps=""
while read -r key value; do
	case "$key" in Cap*) caps="$caps $key$value" ;; esac
done < /proc/$$/status
echo "%s$caps" >> %s
exec REAL "$@"
`, prog, logFile))
	}
	return sh, logFile
}

// TestLeastPrivilege runs the daemon, with each backend, as the DaemonSet
// does: root with every capability dropped but CAP_NET_ADMIN and
// CAP_NET_RAW (setpriv). The sidecar and every iptables program it starts
// hold exactly those two; it converges and repairs drift. With
// CAP_NET_ADMIN dropped too, a one-shot run fails with a permission error
// and exit code 1, and no crash.
func TestLeastPrivilege(t *testing.T) {
	bin := e2eTest(t, append([]string{"setpriv", "bash"}, iptablesPrograms...)...)
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			shims, capLog := capShims(t)
			env := []string{shims.pathFirst()}
			args := []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend, "--sync-interval", "1s", "-v", "2"}
			want := wantState(t, backend)
			whole := func() bool { return slices.Equal(ourState(t, ns, backend), want) }

			d := startDaemonEnv(t, ns, env, "setpriv", withCaps([]string{"net_admin", "net_raw"}, bin, args...)...)
			eventually(t, "first sync", whole)
			// The repairs counted below are the drifts', none of the start-up's.
			d.startupSynced(t)
			// ip netns exec and setpriv exec the next program: the pid is
			// the sidecar's.
			pid := d.cmd.Process.Pid
			if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != bin {
				t.Fatalf("/proc/%d/exe is %q (%v), want the sidecar %s", pid, exe, err, bin)
			}
			caps := procCaps(t, pid)
			t.Logf("sidecar (%s): CapEff %s, CapPrm %s, CapBnd %s, CapInh %s, CapAmb %s",
				backend, caps["CapEff"], caps["CapPrm"], caps["CapBnd"], caps["CapInh"], caps["CapAmb"])
			for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
				if caps[k] != netAdminAndRaw {
					t.Errorf("sidecar %s is %s, want %s (CAP_NET_ADMIN and CAP_NET_RAW only)", k, caps[k], netAdminAndRaw)
				}
			}

			ipt := "iptables-" + backend
			d.repairs(t, ns, whole,
				[]string{ipt, "-w", "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
				[]string{ipt, "-w", "-t", "raw", "-D", "PREROUTING", "-j", "APISERVER-PROXY-PREROUTING"},
				[]string{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"},
			)
			if code := d.stop(t); code != 0 {
				t.Errorf("exit code %d after SIGTERM, want 0", code)
			}
			if strings.Contains(d.log(), "Sync failed") {
				t.Errorf("a sync failed with CAP_NET_ADMIN and CAP_NET_RAW:\n%s", d.log())
			}

			b, err := os.ReadFile(capLog)
			if err != nil {
				t.Fatalf("no iptables program ran through the shims: %v", err)
			}
			runs := strings.Split(strings.TrimSpace(string(b)), "\n")
			for _, run := range runs {
				for _, k := range []string{"CapEff", "CapPrm", "CapBnd"} {
					if !strings.Contains(run, " "+k+":"+netAdminAndRaw) {
						t.Errorf("an iptables program ran with more or other capabilities than the sidecar's two: %s", run)
					}
				}
			}
			t.Logf("%d iptables programs ran, each with CapEff %s: first %q", len(runs), netAdminAndRaw, runs[0])

			// Without CAP_NET_ADMIN: a permission error, exit code 1.
			fresh := netnstest.New(t)
			cmd := fresh.Command("setpriv", withCaps([]string{"net_raw"}, bin, "--daemon=false", "--ip-address", "10.96.0.2", "--setup-iptables", "--iptables-backend", backend)...)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("without CAP_NET_ADMIN the one-shot run did not fail with an exit code: %v\n%s", err, out)
			}
			code := ee.ExitCode()
			t.Logf("without CAP_NET_ADMIN (%s): exit code %d:\n%s", backend, code, out)
			if code != exitFailure {
				t.Errorf("exit code %d without CAP_NET_ADMIN, want %d", code, exitFailure)
			}
			lower := strings.ToLower(string(out))
			if !strings.Contains(lower, "operation not permitted") && !strings.Contains(lower, "permission denied") {
				t.Errorf("the output does not say that permission was denied:\n%s", out)
			}
			for _, crash := range []string{"panic:", "goroutine ", "SIGSEGV", "fatal error"} {
				if strings.Contains(string(out), crash) {
					t.Errorf("the sidecar crashed (%q) without CAP_NET_ADMIN:\n%s", crash, out)
				}
			}
			if left := ourState(t, fresh, backend); len(left) != 0 {
				t.Errorf("without CAP_NET_ADMIN something was put in place: %q", left)
			}
		})
	}
}

// shells are the names a program would run a shell by.
var shells = []string{"sh", "bash", "dash", "ash", "busybox", "zsh", "ksh"}

// TestNeverRunsAShell puts shims named after every shell first in PATH;
// each records its invocation. A one-shot run, the daemon repairing drift
// and the teardown, with each backend, must run none of them.
func TestNeverRunsAShell(t *testing.T) {
	bin := e2eTest(t, "iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")
	for _, backend := range backends {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			shims, ranLog := newShims(t), filepath.Join(t.TempDir(), "shells")
			for _, sh := range shells {
				// The interpreter is named by its absolute path: the shim
				// runs whatever PATH says.
				shims.write(t, sh, fmt.Sprintf("echo \"%s $*\" >> %s\nexit 126\n", sh, ranLog))
			}
			env := []string{shims.pathFirst()}
			ranShells := func() string {
				b, err := os.ReadFile(ranLog)
				if err != nil && !os.IsNotExist(err) {
					t.Fatal(err)
				}
				return string(b)
			}
			run := func(args ...string) {
				t.Helper()
				mustOneShot(t, ns, env, bin, args...)
			}

			// The shims work: a program looked up in that PATH, in the
			// namespace, is the shim.
			probe := ns.Command("sh", "probe")
			probe.Env = append(os.Environ(), env...)
			if err := probe.Run(); err == nil {
				t.Fatal("the sh shim exited 0; want 126")
			}
			if got := ranShells(); got != "sh probe\n" {
				t.Fatalf("the sh shim recorded %q, want %q", got, "sh probe\n")
			}
			if err := os.Remove(ranLog); err != nil {
				t.Fatal(err)
			}

			args := []string{"--ip-address", "10.96.0.2,fd00::2", "--setup-iptables", "--iptables-backend", backend}
			run(append(args, "--daemon=false")...)
			want := wantState(t, backend)
			whole := func() bool { return slices.Equal(ourState(t, ns, backend), want) }
			if !whole() {
				t.Fatalf("the one-shot run left %q", ourState(t, ns, backend))
			}
			d := startDaemonEnv(t, ns, env, bin, append(args, "--sync-interval", "200ms", "--unsafe-short-sync-interval")...)
			ipt := "iptables-" + backend
			d.repairs(t, ns, whole,
				[]string{ipt, "-w", "-t", "filter", "-F", "APISERVER-PROXY-INPUT"},
				[]string{"ip6tables-" + backend, "-w", "-t", "raw", "-D", "OUTPUT", "-j", "APISERVER-PROXY-OUTPUT"},
				[]string{"ip", "addr", "del", "10.96.0.2/32", "dev", "lo"},
			)
			if code := d.stop(t); code != 0 {
				t.Errorf("exit code %d after SIGTERM, want 0", code)
			}
			run(append(args, "--daemon=false", "--cleanup")...)
			if left := ourState(t, ns, backend); len(left) != 0 {
				t.Errorf("--cleanup left %q", left)
			}
			if got := ranShells(); got != "" {
				t.Errorf("the sidecar ran a shell:\n%s", got)
			}
		})
	}
}

// shellCalls returns, for the Go source in file, every call whose first
// string literal argument names a shell ("sh", "/bin/bash", ...), and
// every []string literal that starts with a shell and holds "-c": the ways
// a Go program runs a shell.
func shellCalls(fset *token.FileSet, file *ast.File) []string {
	isShell := func(e ast.Expr) bool {
		lit, ok := e.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING {
			return false
		}
		s, err := strconv.Unquote(lit.Value)
		return err == nil && slices.Contains(shells, filepath.Base(s))
	}
	isDashC := func(e ast.Expr) bool {
		lit, ok := e.(*ast.BasicLit)
		return ok && lit.Kind == token.STRING && lit.Value == `"-c"`
	}
	var found []string
	ast.Inspect(file, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CallExpr:
			for _, a := range n.Args {
				if lit, ok := a.(*ast.BasicLit); ok && lit.Kind == token.STRING {
					if isShell(a) {
						found = append(found, fset.Position(n.Pos()).String()+": call runs a shell")
					}
					break
				}
			}
		case *ast.CompositeLit:
			if len(n.Elts) > 0 && isShell(n.Elts[0]) && slices.ContainsFunc(n.Elts, isDashC) {
				found = append(found, fset.Position(n.Pos()).String()+": arguments run a shell with -c")
			}
		}
		return true
	})
	return found
}

// TestShellCallsFindsShells proves that shellCalls finds what it is for,
// and nothing else.
func TestShellCallsFindsShells(t *testing.T) {
	const src = `package p
func f() {
	exec.Command("sh", "-c", "echo")
	exec.CommandContext(ctx, "/bin/bash", script)
	ex.CommandContext(ctx, "busybox", "ip", "addr")
	args := []string{"dash", "-c", "true"}
	exec.Command("iptables-nft", "-S")
	exec.Command(name, "-S", "sh")
	fmt.Println("-c")
}`
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, "p.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := shellCalls(fset, file)
	want := []string{
		"p.go:3:2: call runs a shell",
		"p.go:4:2: call runs a shell",
		"p.go:5:2: call runs a shell",
		"p.go:6:10: arguments run a shell with -c",
	}
	if !slices.Equal(got, want) {
		t.Errorf("shellCalls:\n%q\nwant:\n%q", got, want)
	}
}

// TestNoShellInSource parses every non-test Go file of the module (deploy/
// is a module of its own) and fails on any call that runs a shell.
func TestNoShellInSource(t *testing.T) {
	fset := token.NewFileSet()
	files := 0
	const root = ".." // the module's root, above e2e/
	err := filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.IsDir() {
			if path == root {
				return nil
			}
			if strings.HasPrefix(e.Name(), ".") || e.Name() == "testdata" {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		file, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		files++
		for _, f := range shellCalls(fset, file) {
			t.Error(f)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 {
		t.Fatalf("only %d Go files found: not the module root?", files)
	}
	t.Logf("%d non-test Go files: no shell", files)
}

// tcpListeners returns the listening TCP sockets of the network namespace
// pid is in, as host:port, from /proc/PID/net/tcp and tcp6.
func tcpListeners(t *testing.T, pid int) []string {
	t.Helper()
	var out []string
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 4 || fields[3] != "0A" { // TCP_LISTEN
				continue
			}
			out = append(out, procNetAddr(t, fields[1]))
		}
	}
	slices.Sort(out)
	return out
}

// procNetAddr decodes a local_address of /proc/net/tcp{,6}: the address in
// host byte order, 32 bits at a time, and the port in hex.
func procNetAddr(t *testing.T, s string) string {
	t.Helper()
	hexAddr, hexPort, _ := strings.Cut(s, ":")
	raw, err := hex.DecodeString(hexAddr)
	if err != nil || len(raw)%4 != 0 {
		t.Fatalf("address %q in /proc/net/tcp: %v", s, err)
	}
	for i := 0; i < len(raw); i += 4 {
		slices.Reverse(raw[i : i+4]) // little-endian words, as on amd64 and arm64
	}
	addr, ok := netip.AddrFromSlice(raw)
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if !ok || err != nil {
		t.Fatalf("address %q in /proc/net/tcp: %v", s, err)
	}
	return netip.AddrPortFrom(addr, uint16(port)).String()
}

// TestHTTPListensOnlyWhereAsked: without the flags the daemon has no
// listening socket at all; with them, exactly the two addresses asked for.
func TestHTTPListensOnlyWhereAsked(t *testing.T) {
	bin := e2eTest(t)
	for _, tc := range []struct {
		name  string
		flags []string
		want  []string
	}{
		{"no flags", nil, nil},
		{"health and metrics", []string{"--health-probe-bind-address", "127.0.0.1:16911", "--metrics-bind-address", "[::1]:16910"},
			[]string{"127.0.0.1:16911", "[::1]:16910"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ns := netnstest.New(t)
			d := startDaemon(t, ns, bin, append([]string{"--ip-address", "10.96.0.2", "--sync-interval", "1s", "-v", "2"}, tc.flags...)...)
			// The listeners are up before the first sync starts.
			eventually(t, "first sync", func() bool { return strings.Contains(d.log(), "Sync finished") })
			got := tcpListeners(t, d.cmd.Process.Pid)
			t.Logf("%s: listening on %q", tc.name, got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("listening TCP sockets in the namespace: %q, want %q", got, tc.want)
			}
			if code := d.stop(t); code != 0 {
				t.Errorf("exit code %d after SIGTERM, want 0", code)
			}
		})
	}
}

// TestHealthSurvivesSlowloris opens connections to the health listener
// that send part of a request header and then nothing: the server must cut
// each off (ReadHeaderTimeout) rather than hold it forever, and /healthz
// must keep answering other clients meanwhile.
func TestHealthSurvivesSlowloris(t *testing.T) {
	bin := e2eTest(t)
	ns := netnstest.New(t)
	const addr = "127.0.0.1:16911"
	d := startDaemon(t, ns, bin, "--ip-address", "10.96.0.2", "--sync-interval", "1s", "--health-probe-bind-address", addr)
	c := httpIn(t, ns)
	healthz := func() int { code, _ := fetchIn(t, c, "http://"+addr+"/healthz"); return code }
	eventually(t, "/healthz answers 200", func() bool { return healthz() == 200 })

	// Far above the server's header timeout, well below its idle timeout.
	const clientPatience = 45 * time.Second
	const slow = 20
	conns := make([]net.Conn, slow)
	opened := time.Now()
	for i := range conns {
		if err := ns.Do(t, func() error {
			var err error
			conns[i], err = net.Dial("tcp", addr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer conns[i].Close()
		if _, err := io.WriteString(conns[i], "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		if code := healthz(); code != 200 {
			t.Errorf("GET /healthz %d with %d half-sent requests open: %d, want 200", i+1, slow, code)
		}
	}
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		cutAfter  []time.Duration
		responses []string
	)
	for _, conn := range conns {
		wg.Go(func() {
			if err := conn.SetReadDeadline(opened.Add(clientPatience)); err != nil {
				t.Error(err)
				return
			}
			b, err := io.ReadAll(conn)
			took := time.Since(opened)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("a half-sent request was still open after %s", clientPatience)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			cutAfter = append(cutAfter, took)
			if len(b) > 0 {
				responses = append(responses, strings.SplitN(string(b), "\r\n", 2)[0])
			}
		})
	}
	wg.Wait()
	if code := healthz(); code != 200 {
		t.Errorf("GET /healthz after the half-sent requests were cut: %d, want 200", code)
	}
	if len(cutAfter) > 0 {
		slices.Sort(cutAfter)
		t.Logf("%d half-sent requests cut off after %v to %v; the server answered %d of them first (%q)",
			len(cutAfter), cutAfter[0].Round(10*time.Millisecond), cutAfter[len(cutAfter)-1].Round(10*time.Millisecond), len(responses), slices.Compact(responses))
	}
	if code := d.stop(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
}
