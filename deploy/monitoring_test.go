package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

const (
	dashboardConfigMap = "apiserver-proxy-dashboard"
	dashboardKey       = "dashboard.json"
	// grafanaLabel is the label Grafana's dashboard sidecar looks for.
	grafanaLabel = "grafana_dashboard"
	// nodeLabel is the label every alert and panel names the node by.
	nodeLabel = "node"
	// nodeSelector is the dashboard's node variable in a query.
	nodeSelector = `node=~"$node"`
)

// TestMonitoringComponent checks that the component adds exactly a
// ServiceMonitor, a PrometheusRule and the dashboard to the base, and that
// the ServiceMonitor scrapes the base's metrics port and names the node.
func TestMonitoringComponent(t *testing.T) {
	r := renderDir(t, monitoringExample)
	b := render(t)
	if len(r.serviceMonitors) != 1 || len(r.prometheusRules) != 1 {
		t.Fatalf("%s: %d ServiceMonitors and %d PrometheusRules, want one of each", monitoringExample, len(r.serviceMonitors), len(r.prometheusRules))
	}
	for name := range b.configMaps {
		if _, ok := r.configMaps[name]; !ok {
			t.Errorf("%s: the base's ConfigMap %s is missing", monitoringExample, name)
		}
	}
	if len(r.configMaps) != len(b.configMaps)+1 || len(r.daemonSets) != 1 || len(r.services) != len(b.services) {
		t.Errorf("%s: want the base's objects and the dashboard's ConfigMap, got ConfigMaps %v", monitoringExample, slices.Sorted(maps.Keys(r.configMaps)))
	}

	sm := r.serviceMonitors[0]
	var svc *corev1.Service
	if len(sm.Spec.Selector.MatchLabels) == 0 {
		t.Fatalf("ServiceMonitor %s selects by no label", sm.Name)
	}
	sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range r.services {
		if s.Namespace == sm.Namespace && sel.Matches(labels.Set(s.Labels)) {
			if svc != nil {
				t.Errorf("ServiceMonitor %s selects more than one Service", sm.Name)
			}
			svc = s
		}
	}
	if svc == nil {
		t.Fatalf("ServiceMonitor %s/%s selects no Service of its namespace (selector %v)", sm.Namespace, sm.Name, sm.Spec.Selector)
	}
	if len(sm.Spec.Endpoints) != 1 {
		t.Fatalf("ServiceMonitor %s: %d endpoints, want 1", sm.Name, len(sm.Spec.Endpoints))
	}
	ep := sm.Spec.Endpoints[0]
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port && p.Name == metricsPort }) {
		t.Errorf("ServiceMonitor %s scrapes port %q, want %q of Service %s", sm.Name, ep.Port, metricsPort, svc.Name)
	}
	if !slices.ContainsFunc(ep.RelabelConfigs, func(rc monitoringv1.RelabelConfig) bool {
		return slices.Equal(rc.SourceLabels, []monitoringv1.LabelName{"__meta_kubernetes_pod_node_name"}) &&
			rc.TargetLabel == nodeLabel && (rc.Action == "" || strings.EqualFold(rc.Action, "replace"))
	}) {
		t.Errorf("ServiceMonitor %s: no relabeling of __meta_kubernetes_pod_node_name into %q, which the alerts and the dashboard name nodes by", sm.Name, nodeLabel)
	}

	cm, ok := r.configMaps[dashboardConfigMap]
	if !ok {
		t.Fatalf("no ConfigMap %s", dashboardConfigMap)
	}
	if cm.Labels[grafanaLabel] != "1" {
		t.Errorf("ConfigMap %s: label %s=%q, want \"1\", which Grafana's dashboard sidecar loads", cm.Name, grafanaLabel, cm.Labels[grafanaLabel])
	}
	if cm.Namespace != namespace || sm.Namespace != namespace || r.prometheusRules[0].Namespace != namespace {
		t.Errorf("monitoring objects must be in %s with the Service they watch", namespace)
	}
	if _, ok := cm.Data[dashboardKey]; !ok || len(cm.Data) != 1 {
		t.Errorf("ConfigMap %s: keys %v, want only %s", cm.Name, slices.Sorted(maps.Keys(cm.Data)), dashboardKey)
	}
}

// The dashboard's JSON model, as far as this component uses it. It is
// decoded strictly: a field this test does not know fails it, so that a
// misspelt key cannot leave a panel quietly broken. Panel options and field
// configuration vary with the panel type and stay opaque.
type (
	dashboard struct {
		Title         string   `json:"title"`
		UID           string   `json:"uid"`
		Description   string   `json:"description"`
		Tags          []string `json:"tags"`
		Timezone      string   `json:"timezone"`
		Editable      bool     `json:"editable"`
		GraphTooltip  int      `json:"graphTooltip"`
		SchemaVersion int      `json:"schemaVersion"`
		Version       int      `json:"version"`
		Refresh       string   `json:"refresh"`
		Time          struct {
			From string `json:"from"`
			To   string `json:"to"`
		} `json:"time"`
		Annotations struct {
			List []json.RawMessage `json:"list"`
		} `json:"annotations"`
		Links      []json.RawMessage `json:"links"`
		Templating struct {
			List []variable `json:"list"`
		} `json:"templating"`
		Panels []panel `json:"panels"`
	}
	datasource struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	}
	variable struct {
		Name       string          `json:"name"`
		Label      string          `json:"label"`
		Type       string          `json:"type"`
		Query      json.RawMessage `json:"query"`
		Datasource *datasource     `json:"datasource"`
		Definition string          `json:"definition"`
		IncludeAll bool            `json:"includeAll"`
		Multi      bool            `json:"multi"`
		AllValue   string          `json:"allValue"`
		Current    json.RawMessage `json:"current"`
		Refresh    int             `json:"refresh"`
		Sort       int             `json:"sort"`
		Regex      string          `json:"regex"`
		Hide       int             `json:"hide"`
		Options    []any           `json:"options"`
	}
	panel struct {
		ID          int             `json:"id"`
		Type        string          `json:"type"`
		Title       string          `json:"title"`
		Description string          `json:"description"`
		Datasource  datasource      `json:"datasource"`
		GridPos     gridPos         `json:"gridPos"`
		Targets     []target        `json:"targets"`
		FieldConfig json.RawMessage `json:"fieldConfig"`
		Options     json.RawMessage `json:"options"`
	}
	gridPos struct {
		H int `json:"h"`
		W int `json:"w"`
		X int `json:"x"`
		Y int `json:"y"`
	}
	target struct {
		RefID        string     `json:"refId"`
		Datasource   datasource `json:"datasource"`
		Expr         string     `json:"expr"`
		LegendFormat string     `json:"legendFormat"`
		Instant      bool       `json:"instant"`
		Range        bool       `json:"range"`
		Format       string     `json:"format"`
	}
)

// readDashboard decodes the dashboard the component's ConfigMap carries.
func readDashboard(t *testing.T) *dashboard {
	t.Helper()
	cm, ok := renderDir(t, monitoringExample).configMaps[dashboardConfigMap]
	if !ok {
		t.Fatalf("no ConfigMap %s", dashboardConfigMap)
	}
	dec := json.NewDecoder(strings.NewReader(cm.Data[dashboardKey]))
	dec.DisallowUnknownFields()
	var d dashboard
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardKey, err)
	}
	return &d
}

// TestDashboard checks the dashboard's structure: every panel queries the
// data source variable, is filtered by the node variable, and has a place of
// its own on the grid.
func TestDashboard(t *testing.T) {
	d := readDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard needs a uid and a title (got %q, %q)", d.UID, d.Title)
	}
	vars := map[string]variable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
	}
	if v, ok := vars["datasource"]; !ok || v.Type != "datasource" || string(v.Query) != `"prometheus"` {
		t.Errorf("want a variable datasource of type datasource for Prometheus, got %+v", v)
	}
	if v, ok := vars["node"]; !ok || !strings.HasPrefix(v.Definition, "label_values(") || !strings.HasSuffix(v.Definition, ", node)") || !v.IncludeAll || v.AllValue != ".*" {
		t.Errorf("want a variable node listing the node label's values, with All meaning .*, got %+v", v)
	}
	want := datasource{Type: "prometheus", UID: "${datasource}"}
	known := []string{"stat", "timeseries", "table", "bargauge", "state-timeline"}
	ids := map[int]bool{}
	var cells []gridPos
	for _, p := range d.Panels {
		what := fmt.Sprintf("panel %d %q", p.ID, p.Title)
		if ids[p.ID] || p.ID == 0 {
			t.Errorf("%s: id missing or used twice", what)
		}
		ids[p.ID] = true
		if !slices.Contains(known, p.Type) {
			t.Errorf("%s: type %q, want one of %v", what, p.Type, known)
		}
		if p.Title == "" || p.Description == "" {
			t.Errorf("%s: a panel needs a title and a description", what)
		}
		if p.Datasource != want {
			t.Errorf("%s: data source %+v, want %+v", what, p.Datasource, want)
		}
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
			t.Errorf("%s: gridPos %+v outside the 24 columns", what, g)
		}
		for _, c := range cells {
			if g.X < c.X+c.W && c.X < g.X+g.W && g.Y < c.Y+c.H && c.Y < g.Y+g.H {
				t.Errorf("%s: gridPos %+v overlaps %+v", what, g, c)
			}
		}
		cells = append(cells, g)
		if len(p.Targets) == 0 {
			t.Errorf("%s: no query", what)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if tg.Datasource != want || tg.RefID == "" || refs[tg.RefID] {
				t.Errorf("%s: query %q: data source %+v and refId %q, want %+v and a refId of its own", what, tg.RefID, tg.Datasource, tg.RefID, want)
			}
			refs[tg.RefID] = true
			if !strings.Contains(tg.Expr, nodeSelector) {
				t.Errorf("%s: query %q does not filter by the node variable (%s)", what, tg.Expr, nodeSelector)
			}
		}
	}
	if len(d.Panels) == 0 {
		t.Fatal("no panels")
	}
}

// TestDashboardQueriesParse runs every query of the dashboard through
// promtool's PromQL parser, as recording rules, with Grafana's variables
// replaced by values Grafana would give them.
func TestDashboardQueriesParse(t *testing.T) {
	bin := promtool(t)
	d := readDashboard(t)
	grafana := strings.NewReplacer(`$__rate_interval`, "2m", `$node`, ".*")
	type rule struct {
		Record string `json:"record"`
		Expr   string `json:"expr"`
	}
	var rules []rule
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			rules = append(rules, rule{fmt.Sprintf("panel_%d_%s", p.ID, tg.RefID), grafana.Replace(tg.Expr)})
		}
	}
	y, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dashboard-rules.yaml"), y, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runPromtool(t, bin, dir, "check", "rules", "dashboard-rules.yaml")
	if err != nil {
		t.Fatalf("promtool check rules on the dashboard's %d queries: %v\n%s", len(rules), err, out)
	}
	if !bytes.Contains([]byte(out), []byte(fmt.Sprintf("%d rules found", len(rules)))) {
		t.Errorf("promtool checked something else than the %d queries:\n%s", len(rules), out)
	}
}
