package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// rulesMarker introduces a fenced block of README.md that must show the
// golden file it names, line for line.
var rulesMarker = regexp.MustCompile(`(?m)^<!-- rules: (\S+) -->\n`)

// readmeBackendLine matches the first line --dry-run prints for each family; it
// depends on the machine, so the golden files do not hold it.
var readmeBackendLine = regexp.MustCompile(`^# IPv[46] iptables backend: `)

// TestREADMERulesMatchGolden keeps the rules README.md shows equal to the
// reviewed golden files (which render's tests keep equal to the template).
func TestREADMERulesMatchGolden(t *testing.T) {
	readme := readFile(t, "README.md")
	matches := rulesMarker.FindAllStringSubmatchIndex(readme, -1)
	var golden []string
	for _, m := range matches {
		path := readme[m[2]:m[3]]
		golden = append(golden, path)
		block, ok := fencedBlock(readme[m[1]:])
		if !ok {
			t.Errorf("README.md: no fenced block right after <!-- rules: %s -->", path)
			continue
		}
		var lines []string
		for line := range strings.Lines(block) {
			if len(lines) == 0 && readmeBackendLine.MatchString(line) {
				continue
			}
			lines = append(lines, line)
		}
		want := slices.Collect(strings.Lines(readFile(t, path)))
		if diff := cmp.Diff(want, lines); diff != "" {
			t.Errorf("README.md's block after <!-- rules: %s --> differs from that file (-file +README):\n%s\ncopy the file into README.md", path, diff)
		}
	}
	if !slices.Contains(golden, "golden/ipv4-default.rules") {
		t.Error("README.md shows no rules block marked <!-- rules: golden/ipv4-default.rules -->")
	}
}

// fencedBlock returns the content of the fenced code block s starts with.
func fencedBlock(s string) (string, bool) {
	open, rest, ok := strings.Cut(s, "\n")
	if !ok || !strings.HasPrefix(open, "```") {
		return "", false
	}
	if strings.HasPrefix(rest, "```") {
		return "", true
	}
	block, _, ok := strings.Cut(rest, "\n```")
	return block + "\n", ok
}

// TestREADMECommandLineMatchesHelp keeps the flag list README.md shows
// under "## Command line" equal to what --help prints.
func TestREADMECommandLineMatchesHelp(t *testing.T) {
	readme := readFile(t, "README.md")
	_, section, ok := strings.Cut(readme, "\n## Command line\n\n")
	if !ok {
		t.Fatal(`README.md has no "## Command line" section`)
	}
	block, ok := fencedBlock(section)
	if !ok {
		t.Fatal(`README.md's "## Command line" does not start with a fenced block`)
	}
	// --help shows klog's flags with their current values as defaults, and
	// other tests of this process set some of them: ask a fresh process.
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelpProcess$")
	cmd.Env = append(os.Environ(), helpProcessEnv+"=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("--help in a fresh process: %v", err)
	}
	_, help, _ := strings.Cut(string(out), "\n") // after "Usage of ...:"
	help, _, _ = strings.Cut(help, helpProcessEnd)
	if diff := cmp.Diff(strings.Split(help, "\n"), strings.Split(block, "\n")); diff != "" {
		t.Errorf("README.md's command-line block differs from --help (-help +README):\n%s\ncopy the output of `go run . --help` into README.md", diff)
	}
}

// helpProcessEnv makes TestHelpProcess print --help, then helpProcessEnd
// (the test framework prints its own lines after).
const (
	helpProcessEnv = "APISERVER_PROXY_SIDECAR_HELP_PROCESS"
	helpProcessEnd = "--- end of help ---"
)

// TestHelpProcess is not a test: run by TestREADMECommandLineMatchesHelp
// in a process of its own, it prints --help.
func TestHelpProcess(t *testing.T) {
	if os.Getenv(helpProcessEnv) == "" {
		t.Skip("prints --help for TestREADMECommandLineMatchesHelp only")
	}
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"--help"}, os.Stdout, &stderr, machine{}); code != exitOK {
		t.Fatalf("--help: exit code %d, stderr %q", code, stderr.String())
	}
	fmt.Println(helpProcessEnd)
}

// TestREADMEMakeTargets checks that every `make TARGET` README.md names is
// a target of the Makefile.
func TestREADMEMakeTargets(t *testing.T) {
	readme := readFile(t, "README.md")
	makefile := readFile(t, "Makefile")
	// `make X` in inline code, or a command line of a code block.
	named := regexp.MustCompile("(?m)(?:`|^)(?:[A-Z]+=\\S+ )*(?:sudo )?make ([a-z][a-z0-9-]*)").FindAllStringSubmatch(readme, -1)
	if len(named) == 0 {
		t.Fatal("README.md names no make target")
	}
	for _, m := range named {
		target := m[1]
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(target) + `:`).MatchString(makefile) {
			t.Errorf("README.md names `make %s`, which the Makefile does not define", target)
		}
	}
}

// TestREADMESetupMatchesCI keeps the packages README.md's set-up line
// installs equal to those CI installs before it runs the same tests.
func TestREADMESetupMatchesCI(t *testing.T) {
	readme, ci := aptPackages(t, "README.md"), aptPackages(t, ".ci/run")
	if diff := cmp.Diff(ci, readme); diff != "" {
		t.Errorf("README.md's set-up line installs other packages than .ci/run (-.ci/run +README.md):\n%s", diff)
	}
	for _, want := range []string{"gcc", "make"} { // the race detector needs cgo
		if !slices.Contains(readme, want) {
			t.Errorf("README.md's set-up line does not install %s", want)
		}
	}
}

var aptInstall = regexp.MustCompile(`(?m)apt-get install ([^\n>` + "`" + `]*)`)

// aptPackages returns the sorted packages of the one apt-get install line
// in path.
func aptPackages(t *testing.T, path string) []string {
	t.Helper()
	lines := aptInstall.FindAllStringSubmatch(readFile(t, path), -1)
	if len(lines) != 1 {
		t.Fatalf("%s: %d apt-get install lines, want 1", path, len(lines))
	}
	var pkgs []string
	for _, f := range strings.Fields(lines[0][1]) {
		if !strings.HasPrefix(f, "-") {
			pkgs = append(pkgs, f)
		}
	}
	slices.Sort(pkgs)
	return pkgs
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
