package deploy

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// rendered is a kustomization rendered and decoded, object by object.
type rendered struct {
	dir             string
	daemonSets      map[string]*appsv1.DaemonSet
	configMaps      map[string]*corev1.ConfigMap
	services        []*corev1.Service
	serviceAccounts map[string]*corev1.ServiceAccount
	serviceMonitors []*monitoringv1.ServiceMonitor
	prometheusRules []*monitoringv1.PrometheusRule
}

// renderDir renders the kustomization in dir as `kubectl kustomize dir`
// does and decodes every object strictly, into the Kubernetes API types and
// prometheus-operator's: an unknown or misspelt field, a duplicate key or a
// kind this test does not know fails the test.
func renderDir(t *testing.T, dir string) *rendered {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := &rendered{
		dir:             dir,
		daemonSets:      map[string]*appsv1.DaemonSet{},
		configMaps:      map[string]*corev1.ConfigMap{},
		serviceAccounts: map[string]*corev1.ServiceAccount{},
	}
	for _, res := range m.Resources() {
		y, err := res.AsYAML()
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, res.CurId(), err)
		}
		what := dir + ": " + res.GetKind()
		switch kind := res.GetKind(); kind {
		case "DaemonSet":
			ds := decode[appsv1.DaemonSet](t, what, y)
			r.daemonSets[ds.Name] = ds
		case "ConfigMap":
			cm := decode[corev1.ConfigMap](t, what, y)
			r.configMaps[cm.Name] = cm
		case "Service":
			r.services = append(r.services, decode[corev1.Service](t, what, y))
		case "ServiceAccount":
			sa := decode[corev1.ServiceAccount](t, what, y)
			r.serviceAccounts[sa.Name] = sa
		case monitoringv1.ServiceMonitorsKind:
			r.serviceMonitors = append(r.serviceMonitors, decode[monitoringv1.ServiceMonitor](t, what, y))
		case monitoringv1.PrometheusRuleKind:
			r.prometheusRules = append(r.prometheusRules, decode[monitoringv1.PrometheusRule](t, what, y))
		default:
			t.Fatalf("%s: rendered a %s, which this test does not know how to check: add it here", dir, kind)
		}
	}
	return r
}

func decode[T any](t *testing.T, what string, y []byte) *T {
	t.Helper()
	var obj T
	if err := yaml.UnmarshalStrict(y, &obj); err != nil {
		t.Fatalf("decoding %s strictly: %v\n%s", what, err, y)
	}
	return &obj
}

// sameAddresses reports how the sidecar's --ip-address list and --port
// differ from what haproxy's bind lines listen on: the same set of
// addresses, each on that port, and nothing else.
func sameAddresses(ipAddress, port string, binds []string) error {
	want := map[netip.Addr]bool{}
	for s := range strings.SplitSeq(ipAddress, ",") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("--ip-address: %q is not an address", s)
		}
		want[a] = true
	}
	got := map[netip.Addr]bool{}
	var errs []string
	for _, b := range binds {
		// bind ADDR:PORT[,ADDR:PORT...] [options]
		list, _, _ := strings.Cut(b, " ")
		for hp := range strings.SplitSeq(list, ",") {
			host, p, err := net.SplitHostPort(hp)
			if err != nil {
				errs = append(errs, fmt.Sprintf("bind %q: %v", hp, err))
				continue
			}
			a, err := netip.ParseAddr(host)
			if err != nil {
				errs = append(errs, fmt.Sprintf("bind %q: not an address (haproxy would listen on whatever it resolves to)", hp))
				continue
			}
			if p != port {
				errs = append(errs, fmt.Sprintf("bind %q: port %s, but the sidecar's rules are for port %s", hp, p, port))
			}
			got[a] = true
		}
	}
	for a := range want {
		if !got[a] {
			errs = append(errs, fmt.Sprintf("haproxy does not listen on %s, which the sidecar keeps", a))
		}
	}
	for a := range got {
		if !want[a] {
			errs = append(errs, fmt.Sprintf("haproxy listens on %s, which the sidecar does not keep", a))
		}
	}
	if len(errs) > 0 {
		slices.Sort(errs)
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// TestSameAddresses proves that the comparison behind TestProxy fails when
// the sidecar and haproxy disagree in any way.
func TestSameAddresses(t *testing.T) {
	for _, tc := range []struct {
		name, ipAddress, port string
		binds                 []string
		wantErr               string
	}{
		{"same", "240.0.0.2,10.96.0.1", "443", []string{"[240.0.0.2]:443,[10.96.0.1]:443"}, ""},
		{"other order and lines", "240.0.0.2,10.96.0.1", "443", []string{"[10.96.0.1]:443", "240.0.0.2:443"}, ""},
		{"IPv6 written two ways", "fd00::2,fd00:10:96::1", "443", []string{"[fd00:0::2]:443,[fd00:10:96:0::1]:443"}, ""},
		{"ClusterIP not bound", "240.0.0.2,10.96.0.1", "443", []string{"[240.0.0.2]:443"}, "does not listen on 10.96.0.1"},
		{"extra bind", "240.0.0.2", "443", []string{"[240.0.0.2]:443,[10.96.0.1]:443"}, "listens on 10.96.0.1, which the sidecar does not keep"},
		{"other port", "240.0.0.2", "443", []string{"[240.0.0.2]:6443"}, "port 6443"},
		{"a name", "240.0.0.2", "443", []string{"proxy.local:443"}, "not an address"},
		{"no port", "240.0.0.2", "443", []string{"240.0.0.2"}, "missing port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := sameAddresses(tc.ipAddress, tc.port, tc.binds)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("error %v, want none", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("error %v, want one saying %q", err, tc.wantErr)
			}
		})
	}
}
