package deploy

import (
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

const (
	// monitoringExample is the base with the monitoring component.
	monitoringExample = "examples/monitoring"
	// alertsTestFile holds promtool's unit tests of the alerts; it reads
	// the rules from rulesFile beside it.
	alertsTestFile = "components/monitoring/alerts_test.yaml"
	rulesFile      = "rules.yaml"
	// runbookBase is where every alert's runbook_url points, followed by
	// the alert's section of README.md.
	runbookBase = "https://github.com/apiserver-proxy/apiserver-proxy-sidecar/blob/main/README.md#"
	readmeFile  = "../README.md"
)

// promtool returns the promtool to run: $PROMTOOL, or promtool in PATH.
// Without one the test skips, except in CI, where it must be there.
func promtool(t *testing.T) string {
	t.Helper()
	name := os.Getenv("PROMTOOL")
	if name == "" {
		name = "promtool"
	}
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("promtool must be installed in CI: %v", err)
		}
		t.Skipf("skipping: no promtool (set PROMTOOL, or see .ci/run for where it comes from): %v", err)
	}
	return path
}

// alertRules renders the monitoring example and returns its one
// PrometheusRule.
func alertRules(t *testing.T) *monitoringv1.PrometheusRule {
	t.Helper()
	r := renderDir(t, monitoringExample)
	if len(r.prometheusRules) != 1 {
		t.Fatalf("%s renders %d PrometheusRules, want 1", monitoringExample, len(r.prometheusRules))
	}
	return r.prometheusRules[0]
}

// writeRules writes spec as a plain Prometheus rules file, next to a copy
// of alertsTestFile, into a new directory, and returns the directory.
func writeRules(t *testing.T, spec monitoringv1.PrometheusRuleSpec) string {
	t.Helper()
	dir := t.TempDir()
	y, err := yaml.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, rulesFile), y, 0o644); err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(alertsTestFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, filepath.Base(alertsTestFile)), tests, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runPromtool runs promtool with args in dir and returns what it printed.
func runPromtool(t *testing.T, bin, dir string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestAlerts lints the rules the PrometheusRule carries and runs their
// unit tests with promtool.
func TestAlerts(t *testing.T) {
	bin := promtool(t)
	dir := writeRules(t, alertRules(t).Spec)
	out, err := runPromtool(t, bin, dir, "check", "rules", rulesFile)
	if err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	t.Logf("promtool check rules:\n%s", out)
	out, err = runPromtool(t, bin, dir, "test", "rules", filepath.Base(alertsTestFile))
	if err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
	t.Logf("promtool test rules:\n%s", out)
}

// TestAlertsCatchBrokenRules proves that the promtool run above fails when
// an alert's expression is broken: by a syntax error, and by a change that
// still parses but no longer fires when it should.
func TestAlertsCatchBrokenRules(t *testing.T) {
	bin := promtool(t)
	for _, tc := range []struct {
		name, alert string
		// edit changes the alert's expression.
		edit func(string) string
		// parses: the broken expression is still valid PromQL, so only the
		// unit tests catch it.
		parses bool
	}{
		{"syntax error", "ApiserverProxySidecarNotReady", func(e string) string { return e + " +" }, false},
		{"unbalanced parenthesis", "ApiserverProxySyncsFailing", func(e string) string { return strings.Replace(e, ")", "", 1) }, false},
		{"metric misspelt", "ApiserverProxySidecarNotReady", func(e string) string {
			return strings.Replace(e, "apiserver_proxy_sidecar_ready", "apiserver_proxy_sidecar_readiness", 1)
		}, true},
		{"threshold changed", "ApiserverProxySyncStale", func(e string) string { return strings.Replace(e, "> 300", "> 3000", 1) }, true},
		{"label matcher wrong", "ApiserverProxySyncsFailing", func(e string) string {
			return strings.Replace(e, `result="failure"`, `result="failed"`, 1)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := alertRules(t).Spec
			found := false
			for g := range spec.Groups {
				for r := range spec.Groups[g].Rules {
					rule := &spec.Groups[g].Rules[r]
					if rule.Alert == tc.alert {
						rule.Expr = intstr.FromString(tc.edit(rule.Expr.String()))
						found = true
					}
				}
			}
			if !found {
				t.Fatalf("no alert %s", tc.alert)
			}
			dir := writeRules(t, spec)
			out, err := runPromtool(t, bin, dir, "check", "rules", rulesFile)
			if parsed := err == nil; parsed != tc.parses {
				t.Errorf("promtool check rules: error %v, want the expression to parse: %v\n%s", err, tc.parses, out)
			}
			out, err = runPromtool(t, bin, dir, "test", "rules", filepath.Base(alertsTestFile))
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("promtool test rules passed (or did not run: %v) with a broken %s\n%s", err, tc.alert, out)
			}
			t.Logf("promtool test rules failed, as it must:\n%s", out)
		})
	}
}

// TestAlertsDocumented checks what an on-call engineer gets from each
// alert: a severity, a summary that names the node, a description, a
// runbook section in README.md that exists, and unit tests that see it
// fire and not fire.
func TestAlertsDocumented(t *testing.T) {
	pr := alertRules(t)
	readme, err := os.ReadFile(readmeFile)
	if err != nil {
		t.Fatal(err)
	}
	headings := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^#+ (.+)$`).FindAllStringSubmatch(string(readme), -1) {
		headings[githubAnchor(m[1])] = true
	}
	tested := alertTests(t)
	var names []string
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("group %s: a rule that is not an alert (%q): this component has alerts only", g.Name, r.Record)
				continue
			}
			names = append(names, r.Alert)
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: severity %q, want critical or warning", r.Alert, s)
			}
			if s := r.Annotations["summary"]; !strings.Contains(s, "{{ $labels.node }}") {
				t.Errorf("%s: summary %q does not name the node ({{ $labels.node }})", r.Alert, s)
			}
			if r.Annotations["description"] == "" {
				t.Errorf("%s: no description", r.Alert)
			}
			anchor := strings.ToLower(r.Alert)
			if got, want := r.Annotations["runbook_url"], runbookBase+anchor; got != want {
				t.Errorf("%s: runbook_url %q, want %q", r.Alert, got, want)
			}
			if !headings[anchor] {
				t.Errorf("%s: README.md has no section #%s (a heading %q)", r.Alert, anchor, r.Alert)
			}
			if len(r.Annotations) != 3 {
				t.Errorf("%s: annotations %v, want summary, description and runbook_url", r.Alert, slices.Sorted(maps.Keys(r.Annotations)))
			}
			if tt := tested[r.Alert]; !tt.fires || !tt.quiet {
				t.Errorf("%s: %s has no test where it fires and one where it does not (fires: %v, quiet: %v)", r.Alert, alertsTestFile, tt.fires, tt.quiet)
			}
		}
	}
	for name := range tested {
		if !slices.Contains(names, name) {
			t.Errorf("%s tests an alert %s that the PrometheusRule does not have", alertsTestFile, name)
		}
	}
	if len(names) == 0 {
		t.Fatal("no alerts")
	}
}

// alertTests reads, for every alert alertsTestFile tests, whether some
// evaluation expects it firing and some expects it not to.
func alertTests(t *testing.T) map[string]struct{ fires, quiet bool } {
	t.Helper()
	y, err := os.ReadFile(alertsTestFile)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(y, &f); err != nil {
		t.Fatalf("%s: %v", alertsTestFile, err)
	}
	got := map[string]struct{ fires, quiet bool }{}
	for _, tc := range f.Tests {
		for _, a := range tc.AlertRuleTest {
			e := got[a.Alertname]
			if len(a.ExpAlerts) > 0 {
				e.fires = true
			} else {
				e.quiet = true
			}
			got[a.Alertname] = e
		}
	}
	return got
}

// githubAnchor is the anchor GitHub gives a Markdown heading: lower case,
// spaces to dashes, punctuation other than dashes and underscores dropped.
func githubAnchor(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || ('a' <= r && r <= 'z') || ('0' <= r && r <= '9'):
			b.WriteRune(r)
		}
	}
	return b.String()
}
