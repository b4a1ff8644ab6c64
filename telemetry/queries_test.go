package telemetry_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/apply"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/render"
	"github.com/apiserver-proxy/apiserver-proxy-sidecar/telemetry"
)

// The monitoring component of deploy/, whose queries must name metrics
// and labels the sidecar exposes.
const (
	monitoringDir  = "../deploy/components/monitoring/"
	rulesFile      = monitoringDir + "prometheusrule.yaml"
	dashboardFile  = monitoringDir + "dashboard.json"
	alertTestsFile = monitoringDir + "alerts_test.yaml"
)

// fromPrometheus are the series and labels Prometheus itself adds to every
// target, beside the ones the sidecar exposes: `up`, the labels of the
// ServiceMonitor's targets (node from its relabeling), and the bucket and
// quantile labels of histograms and summaries.
var (
	fromPrometheus       = []string{"up"}
	labelsFromPrometheus = []string{"job", "instance", "namespace", "pod", "service", "endpoint", "container", "node", "le", "quantile"}
)

// exposed returns every series name and label name the sidecar's registry
// serves, with every metric given a series by calling each method of the
// observer once.
func exposed(t *testing.T) (names, labels map[string]bool) {
	t.Helper()
	tm := telemetry.New(telemetry.Options{SyncInterval: time.Minute, Version: "test"})
	tm.SyncFinished(apply.SyncResult{Duration: time.Millisecond})
	tm.Repaired(apply.ObjectChain)
	tm.RestoreRan(render.IPv4, nil)
	tm.BackendChosen(render.IPv4, apply.BackendNFT)
	tm.Verification(apply.TriggerInterval)
	tm.VerificationSkipped(apply.SkipGenerationUnchanged)
	tm.UntrackedDNAT(netip.MustParseAddrPort("10.96.0.1:443"), netip.MustParseAddrPort("240.0.0.2:443"), 1)
	families, err := tm.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	names, labels = map[string]bool{}, map[string]bool{}
	for _, f := range families {
		name := f.GetName()
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			names[name+"_bucket"], names[name+"_sum"], names[name+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			names[name], names[name+"_sum"], names[name+"_count"] = true, true, true
		default:
			names[name] = true
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = true
			}
		}
	}
	for _, n := range fromPrometheus {
		names[n] = true
	}
	for _, l := range labelsFromPrometheus {
		labels[l] = true
	}
	if !names[telemetry.Namespace+"_ready"] || !names[telemetry.Namespace+"_sync_duration_seconds_bucket"] {
		t.Fatalf("the registry serves %v: not the sidecar's metrics", slices.Sorted(maps.Keys(names)))
	}
	return names, labels
}

// TestMonitoringQueriesExist checks that every metric and label the alerts,
// their unit tests and the dashboard of deploy/'s monitoring component
// query is one the sidecar exposes: a renamed metric would otherwise leave
// an alert that never fires and an empty panel.
func TestMonitoringQueriesExist(t *testing.T) {
	names, labels := exposed(t)
	queries := monitoringQueries(t)
	if len(queries) < 20 {
		t.Fatalf("found only %d queries in %s: the files changed shape?", len(queries), monitoringDir)
	}
	used := map[string]bool{}
	for _, q := range queries {
		metrics, err := checkQuery(q.expr, names, labels)
		if err != nil {
			t.Errorf("%s: %v\n  query: %s", q.where, err, q.expr)
		}
		for _, m := range metrics {
			used[m] = true
		}
	}
	t.Logf("%d queries name %d metrics: %v", len(queries), len(used), slices.Sorted(maps.Keys(used)))
}

// TestCheckQueryCatchesMissing proves that the check fails on a metric or
// a label the sidecar does not expose, whatever prefix it has.
func TestCheckQueryCatchesMissing(t *testing.T) {
	names, labels := exposed(t)
	for _, tc := range []struct{ expr, want string }{
		{`rate(apiserver_proxy_sidecar_sync_total[5m]) > 0`, "apiserver_proxy_sidecar_sync_total"},
		{`apiserver_proxy_sidcar_ready == 0`, "apiserver_proxy_sidcar_ready"},
		{`sum by (node) (rate(apiserver_proxy_sidecar_syncs_total{result="failure"}[5m])) / sum by (node) (rate(apiserver_proxy_sidecar_sync_count[5m]))`, "apiserver_proxy_sidecar_sync_count"},
		{`histogram_quantile(0.9, sum by (le) (rate(apiserver_proxy_sidecar_sync_duration_seconds[5m])))`, "apiserver_proxy_sidecar_sync_duration_seconds"},
		{`{__name__="apiserver_proxy_sidecar_repairs"}`, "apiserver_proxy_sidecar_repairs"},
		{`sum by (objects) (apiserver_proxy_sidecar_repairs_total)`, `label "objects"`},
		{`apiserver_proxy_sidecar_iptables_backend_info{famliy="IPv4"}`, `label "famliy"`},
		{`apiserver_proxy_sidecar_ready == on (nodename) group_left () up`, `label "nodename"`},
		{`rate(apiserver_proxy_sidecar_repairs_total[$__rate_interval]) * $factor`, "Grafana variable"},
	} {
		if _, err := checkQuery(tc.expr, names, labels); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one naming %s", tc.expr, err, tc.want)
		}
	}
	// And what the real files use passes.
	for _, ok := range []string{
		`increase(apiserver_proxy_sidecar_untracked_dnat_connections_total[15m]) > 0 or apiserver_proxy_sidecar_untracked_dnat_connections_total * 1 unless apiserver_proxy_sidecar_untracked_dnat_connections_total offset 15m`,
		`topk(10, histogram_quantile(0.99, sum by (node, le) (rate(apiserver_proxy_sidecar_sync_duration_seconds_bucket{node=~"$node"}[$__rate_interval]))))`,
		`count(up{job="apiserver-proxy"} == 0) or vector(0)`,
	} {
		if _, err := checkQuery(ok, names, labels); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
}

// query is one PromQL expression and where it was found.
type query struct{ where, expr string }

// monitoringQueries collects every query of the component: the alerts'
// expressions, the series their unit tests feed in, the dashboard's
// panel queries and its variables' label_values().
func monitoringQueries(t *testing.T) []query {
	t.Helper()
	var qs []query

	var pr struct {
		Spec struct {
			Groups []struct {
				Rules []struct {
					Alert string `yaml:"alert"`
					Expr  string `yaml:"expr"`
				} `yaml:"rules"`
			} `yaml:"groups"`
		} `yaml:"spec"`
	}
	readYAML(t, rulesFile, &pr)
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			qs = append(qs, query{rulesFile + ": alert " + r.Alert, r.Expr})
		}
	}

	var tests struct {
		Tests []struct {
			InputSeries []struct {
				Series string `yaml:"series"`
			} `yaml:"input_series"`
		} `yaml:"tests"`
	}
	readYAML(t, alertTestsFile, &tests)
	for i, tc := range tests.Tests {
		for _, s := range tc.InputSeries {
			qs = append(qs, query{fmt.Sprintf("%s: test %d, input series", alertTestsFile, i+1), s.Series})
		}
	}

	var d struct {
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	for _, v := range d.Templating.List {
		// label_values(SELECTOR, LABEL): a query of Grafana's, not PromQL.
		inner, ok := strings.CutPrefix(v.Definition, "label_values(")
		if !ok {
			continue
		}
		inner = strings.TrimSuffix(inner, ")")
		i := strings.LastIndex(inner, ",")
		if i < 0 {
			t.Errorf("%s: variable %s: %q has no selector", dashboardFile, v.Name, v.Definition)
			continue
		}
		label := strings.TrimSpace(inner[i+1:])
		qs = append(qs, query{dashboardFile + ": variable " + v.Name, fmt.Sprintf("%s{%s!=\"\"}", strings.TrimSpace(inner[:i]), label)})
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			qs = append(qs, query{dashboardFile + ": panel " + p.Title, tg.Expr})
		}
	}
	return qs
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// checkQuery returns the metrics expr selects, and an error naming each
// metric and label among them that the sidecar does not expose.
func checkQuery(expr string, names, labels map[string]bool) ([]string, error) {
	metrics, ls, err := selectors(expr)
	if err != nil {
		return nil, err
	}
	var errs []string
	for _, m := range metrics {
		if !names[m] {
			errs = append(errs, fmt.Sprintf("metric %s is not one the sidecar exposes", m))
		}
	}
	for _, l := range ls {
		if !labels[l] {
			errs = append(errs, fmt.Sprintf("label %q is on no metric the sidecar exposes, nor added by Prometheus", l))
		}
	}
	if len(metrics) == 0 {
		errs = append(errs, "selects no metric")
	}
	if len(errs) > 0 {
		return metrics, fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return metrics, nil
}

// PromQL words that are not metric names. A word followed by "(" is a
// function or an aggregation and is not either.
var (
	promqlKeywords = []string{"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
	// grouping words take a list of label names in parentheses.
	promqlGrouping = []string{"by", "without", "on", "ignoring", "group_left", "group_right"}
	// aggregations may take their grouping before their parentheses.
	promqlAggregations = []string{"sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "limitk", "limit_ratio"}
)

// selectors returns the metric names and the label names a PromQL
// expression uses. It is a lexer, not a parser: it understands what the
// component's queries use (selectors, matchers, ranges, grouping,
// functions, operators, Grafana's $variables inside ranges and matchers)
// and refuses a Grafana variable elsewhere, or a metric chosen by a regular
// expression on __name__.
func selectors(expr string) (metrics, labels []string, err error) {
	s := []rune(expr)
	i := 0
	skipSpace := func() {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
			i++
		}
	}
	isIdentStart := func(r rune) bool { return r == '_' || r == ':' || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z') }
	isIdent := func(r rune) bool { return isIdentStart(r) || ('0' <= r && r <= '9') }
	ident := func() string {
		start := i
		for i < len(s) && isIdent(s[i]) {
			i++
		}
		return string(s[start:i])
	}
	str := func() (string, error) {
		q := s[i]
		i++
		var b strings.Builder
		for i < len(s) && s[i] != q {
			if s[i] == '\\' && q != '`' && i+1 < len(s) {
				i++
			}
			b.WriteRune(s[i])
			i++
		}
		if i >= len(s) {
			return "", fmt.Errorf("unterminated string at %d", i)
		}
		i++
		return b.String(), nil
	}
	addLabel := func(l string) {
		if !slices.Contains(labels, l) {
			labels = append(labels, l)
		}
	}
	addMetric := func(m string) {
		if !slices.Contains(metrics, m) {
			metrics = append(metrics, m)
		}
	}
	// labelList reads "(a, b, ...)" after a grouping word.
	labelList := func() error {
		skipSpace()
		if i >= len(s) || s[i] != '(' {
			return nil // group_left without labels
		}
		i++
		for {
			skipSpace()
			if i < len(s) && s[i] == ')' {
				i++
				return nil
			}
			if i >= len(s) || !isIdentStart(s[i]) {
				return fmt.Errorf("a label list that is not one at %d", i)
			}
			addLabel(ident())
			skipSpace()
			if i < len(s) && s[i] == ',' {
				i++
			}
		}
	}
	// matchers reads "{name op "value", ...}".
	matchers := func() error {
		i++ // {
		for {
			skipSpace()
			if i < len(s) && s[i] == '}' {
				i++
				return nil
			}
			if i >= len(s) || !isIdentStart(s[i]) {
				return fmt.Errorf("a label matcher that is not one at %d", i)
			}
			name := ident()
			skipSpace()
			start := i
			for i < len(s) && strings.ContainsRune("=!~", s[i]) {
				i++
			}
			op := string(s[start:i])
			skipSpace()
			if i >= len(s) || !strings.ContainsRune("\"'`", s[i]) {
				return fmt.Errorf("matcher %s%s without a string at %d", name, op, i)
			}
			v, err := str()
			if err != nil {
				return err
			}
			if name == "__name__" {
				if op != "=" {
					return fmt.Errorf("a metric chosen by %s%s%q cannot be checked", name, op, v)
				}
				addMetric(v)
			} else {
				addLabel(name)
			}
			skipSpace()
			if i < len(s) && s[i] == ',' {
				i++
			}
		}
	}
	for {
		skipSpace()
		if i >= len(s) {
			return metrics, labels, nil
		}
		switch r := s[i]; {
		case r == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case r == '"' || r == '\'' || r == '`':
			if _, err := str(); err != nil {
				return nil, nil, err
			}
		case r == '{':
			if err := matchers(); err != nil {
				return nil, nil, err
			}
		case r == '[':
			// A range or a subquery: durations, and $__rate_interval.
			for i < len(s) && s[i] != ']' {
				i++
			}
			i++
		case r == '$':
			return nil, nil, fmt.Errorf("a Grafana variable outside a range or a matcher at %d: %q", i, string(s[i:]))
		case '0' <= r && r <= '9' || r == '.':
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') {
				i++
			}
		case isIdentStart(r):
			word := ident()
			lower := strings.ToLower(word)
			skipSpace()
			switch {
			case slices.Contains(promqlKeywords, lower):
			case slices.Contains(promqlGrouping, lower):
				if err := labelList(); err != nil {
					return nil, nil, err
				}
			case slices.Contains(promqlAggregations, lower), i < len(s) && s[i] == '(':
				// An aggregation or a function.
			default:
				addMetric(word)
			}
		case strings.ContainsRune("()+-*/%^=!<>,@:", r):
			i++
		default:
			return nil, nil, fmt.Errorf("unexpected %q at %d", r, i)
		}
	}
}
