package deploy

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
)

const (
	uninstallDir       = "uninstall"
	uninstallDaemonSet = "apiserver-proxy-uninstall"
	teardownName       = "teardown"
	pauseImage         = "registry.k8s.io/pause:"
)

// sameSettings are the flags by which the sidecar knows what is its own on
// a node: the teardown must give each the base's value, or leave it unset
// where the base does.
var sameSettings = []string{"ip-address", "port", "interface", "iptables-backend"}

// teardownFlags returns how teardown's flags differ from a teardown of what
// the sidecar with base's flags keeps: base's settings, and the one-shot
// cleanup with rules.
func teardownFlags(base, teardown map[string]string) []string {
	var diffs []string
	for _, name := range sameSettings {
		b, inBase := base[name]
		got, inTeardown := teardown[name]
		if inBase != inTeardown || b != got {
			diffs = append(diffs, fmt.Sprintf("--%s=%q, but the base runs with --%s=%q", name, got, name, b))
		}
	}
	want := map[string]string{"daemon": "false", "cleanup": "true", "setup-iptables": "true"}
	for name, v := range want {
		if teardown[name] != v {
			diffs = append(diffs, fmt.Sprintf("--%s=%q, want %q", name, teardown[name], v))
		}
	}
	for name := range teardown {
		if _, ok := want[name]; !ok && !slices.Contains(sameSettings, name) {
			diffs = append(diffs, fmt.Sprintf("unexpected flag --%s", name))
		}
	}
	slices.Sort(diffs)
	return diffs
}

// TestTeardownFlags proves that the comparison behind TestUninstall fails
// on each way the teardown could miss what the base put on a node.
func TestTeardownFlags(t *testing.T) {
	base := map[string]string{"ip-address": "240.0.0.2,10.96.0.1", "port": "443", "interface": "apiserver-proxy", "setup-iptables": "true", "daemon": "false"}
	good := map[string]string{"ip-address": "240.0.0.2,10.96.0.1", "port": "443", "interface": "apiserver-proxy", "setup-iptables": "true", "daemon": "false", "cleanup": "true"}
	if d := teardownFlags(base, good); len(d) > 0 {
		t.Fatalf("a faithful teardown: %v", d)
	}
	for _, tc := range []struct {
		name string
		edit func(m map[string]string)
		want string
	}{
		{"another address list", func(m map[string]string) { m["ip-address"] = "240.0.0.2" }, "--ip-address"},
		{"another port", func(m map[string]string) { m["port"] = "6443" }, "--port"},
		{"the default interface", func(m map[string]string) { delete(m, "interface") }, "--interface"},
		{"a backend the base does not force", func(m map[string]string) { m["iptables-backend"] = "nft" }, "--iptables-backend"},
		{"rules left alone", func(m map[string]string) { delete(m, "setup-iptables") }, "--setup-iptables"},
		{"no cleanup", func(m map[string]string) { delete(m, "cleanup") }, "--cleanup"},
		{"a daemon", func(m map[string]string) { m["daemon"] = "true" }, "--daemon"},
		{"a flag more", func(m map[string]string) { m["sync-interval"] = "1s" }, "unexpected flag --sync-interval"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := maps.Clone(good)
			tc.edit(m)
			if d := teardownFlags(base, m); !slices.ContainsFunc(d, func(s string) bool { return strings.Contains(s, tc.want) }) {
				t.Errorf("differences %v, want one about %s", d, tc.want)
			}
		})
	}
}

// TestUninstall checks that the uninstall overlay renders one DaemonSet
// whose init container tears down what the base's sidecar keeps, with the
// base's settings, on every node the base runs on, and then idles.
func TestUninstall(t *testing.T) {
	b := render(t)
	u := renderDir(t, uninstallDir)
	ds, ok := u.daemonSets[uninstallDaemonSet]
	if !ok || len(u.daemonSets) != 1 {
		t.Fatalf("%s renders DaemonSets %v, want exactly %s", uninstallDir, slices.Sorted(maps.Keys(u.daemonSets)), uninstallDaemonSet)
	}
	if len(u.configMaps)+len(u.services)+len(u.serviceMonitors)+len(u.prometheusRules) > 0 {
		t.Errorf("%s renders more than a DaemonSet and its ServiceAccount: %d ConfigMaps, %d Services", uninstallDir, len(u.configMaps), len(u.services))
	}
	if ds.Namespace != namespace {
		t.Errorf("DaemonSet %s in %q, want %q", ds.Name, ds.Namespace, namespace)
	}
	pod := ds.Spec.Template.Spec
	basePod := b.daemonSet.Spec.Template.Spec

	// The base's Service (and so its ServiceMonitor) must not select the
	// teardown's pods, nor the base's selector adopt them.
	for _, s := range b.services {
		if labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(ds.Spec.Template.Labels)) {
			t.Errorf("the base's Service %s selects the teardown's pods (labels %v)", s.Name, ds.Spec.Template.Labels)
		}
	}
	if _, ok := u.serviceAccounts[pod.ServiceAccountName]; !ok {
		t.Errorf("serviceAccountName %q is not rendered", pod.ServiceAccountName)
	}

	// On every node the base runs on, in the node's network.
	if !pod.HostNetwork || pod.PriorityClassName != basePod.PriorityClassName ||
		!slices.Equal(pod.Tolerations, basePod.Tolerations) || !maps.Equal(pod.NodeSelector, basePod.NodeSelector) || pod.Affinity != nil {
		t.Errorf("the teardown must run on the base's nodes, in the host network: hostNetwork %v, priorityClass %q, tolerations %v, nodeSelector %v",
			pod.HostNetwork, pod.PriorityClassName, pod.Tolerations, pod.NodeSelector)
	}

	if len(pod.InitContainers) != 1 || pod.InitContainers[0].Name != teardownName {
		t.Fatalf("init containers %v, want exactly %q", containerNames(pod.InitContainers), teardownName)
	}
	td := &pod.InitContainers[0]
	setup := container(t, basePod.InitContainers, setupName)
	sidecar := container(t, basePod.Containers, sidecarName)
	if td.Image != sidecar.Image {
		t.Errorf("teardown image %q, want the sidecar's %q", td.Image, sidecar.Image)
	}
	got := parseFlags(t, td)
	for _, c := range []*corev1.Container{setup, sidecar} {
		for _, d := range teardownFlags(parseFlags(t, c), got) {
			t.Errorf("teardown against the base's %s: %s", c.Name, d)
		}
	}
	checkSecurity(t, td, "NET_ADMIN", "NET_RAW")
	if !slices.ContainsFunc(td.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.MountPath == xtablesLock && volume(t, pod, m.Name).HostPath != nil
	}) {
		t.Errorf("teardown: the host's %s is not mounted", xtablesLock)
	}
	for _, v := range pod.Volumes {
		if v.HostPath == nil || v.HostPath.Path != xtablesLock {
			t.Errorf("volume %s: the teardown needs the xtables lock only", v.Name)
		}
	}

	// Then idle, so that `rollout status` returns once every node is clean.
	if len(pod.Containers) != 1 {
		t.Fatalf("containers %v, want one that idles", containerNames(pod.Containers))
	}
	p := &pod.Containers[0]
	if !strings.HasPrefix(p.Image, pauseImage) || !pinned(p.Image) || len(p.Command)+len(p.Args) > 0 || len(p.Ports) > 0 {
		t.Errorf("container %s: image %q, command %q, args %q, ports %v: want a pinned %s... as it is", p.Name, p.Image, p.Command, p.Args, p.Ports, pauseImage)
	}
	checkSecurity(t, p)
	if sc := p.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("container %s: want runAsNonRoot: it needs nothing", p.Name)
	}
}
