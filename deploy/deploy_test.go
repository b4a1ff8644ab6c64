package deploy

import (
	"bufio"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Names the manifests and this test agree on.
const (
	namespace      = "kube-system"
	daemonSetName  = "apiserver-proxy"
	settingsFile   = "base/config.yaml"
	setupName      = "setup"
	sidecarName    = "sidecar"
	proxyName      = "proxy"
	xtablesLock    = "/run/xtables.lock"
	haproxyCfgKey  = "haproxy.cfg"
	metricsPort    = "metrics"
	probeHost      = "127.0.0.1"
	localConfigKey = "config.kubernetes.io/local-config"
	// interfaceName is the sidecar's own dummy link.
	interfaceName = "apiserver-proxy"
	// interceptedPort is the `kubernetes` Service's port.
	interceptedPort = "443"
)

// base is the kustomize base rendered and decoded, with the values of
// config.yaml and its one DaemonSet.
type base struct {
	*rendered
	settings  settings
	daemonSet *appsv1.DaemonSet
}

// settings are the values of config.yaml, the one place they are set.
type settings struct {
	// Address is the proxy's own address; ServiceIP the `kubernetes`
	// Service's ClusterIP, intercepted on every node.
	Address, ServiceIP, Port, Upstream string
}

// addresses is the list the sidecar is given: the proxy address, then the
// ClusterIP.
func (s settings) addresses() string { return s.Address + "," + s.ServiceIP }

// render renders the base in this directory and checks that it holds
// exactly one DaemonSet, the one this test knows.
func render(t *testing.T) *base {
	t.Helper()
	r := renderDir(t, ".")
	ds, ok := r.daemonSets[daemonSetName]
	if !ok || len(r.daemonSets) != 1 {
		t.Fatalf("rendered DaemonSets %v, want exactly %q", slices.Sorted(maps.Keys(r.daemonSets)), daemonSetName)
	}
	return &base{rendered: r, settings: readSettings(t), daemonSet: ds}
}

func readSettings(t *testing.T) settings {
	t.Helper()
	y, err := os.ReadFile(settingsFile)
	if err != nil {
		t.Fatal(err)
	}
	cm := decode[corev1.ConfigMap](t, "ConfigMap", y)
	if cm.Annotations[localConfigKey] != "true" {
		t.Errorf("%s: want annotation %s: \"true\", so that it only feeds kustomize", settingsFile, localConfigKey)
	}
	s := settings{Address: cm.Data["address"], ServiceIP: cm.Data["serviceIP"], Port: cm.Data["port"], Upstream: cm.Data["upstream"]}
	proxy, err := netip.ParseAddr(s.Address)
	if err != nil || proxy.Zone() != "" {
		t.Errorf("%s: address %q is not an IP address", settingsFile, s.Address)
	}
	service, err := netip.ParseAddr(s.ServiceIP)
	if err != nil || service.Zone() != "" {
		t.Errorf("%s: serviceIP %q is not an IP address", settingsFile, s.ServiceIP)
	}
	if proxy == service {
		t.Errorf("%s: address and serviceIP are both %s: the proxy needs an address of its own next to the ClusterIP it intercepts", settingsFile, s.Address)
	}
	// The `kubernetes` Service listens on 443; the interception answers
	// the ClusterIP on the same port.
	if s.Port != interceptedPort {
		t.Errorf("%s: port %q, want %s, the `kubernetes` Service's port, or the interception of %s does not catch its clients", settingsFile, s.Port, interceptedPort, s.ServiceIP)
	}
	if _, _, err := net.SplitHostPort(s.Upstream); err != nil {
		t.Errorf("%s: upstream %q is not host:port: %v", settingsFile, s.Upstream, err)
	}
	if len(cm.Data) != 4 {
		t.Errorf("%s: want exactly address, serviceIP, port and upstream, got %v", settingsFile, cm.Data)
	}
	return s
}

func TestObjects(t *testing.T) {
	b := render(t)
	var names []string
	check := func(kind, name, ns string) {
		names = append(names, kind+"/"+name)
		if ns != namespace {
			t.Errorf("%s/%s: namespace %q, want %q", kind, name, ns, namespace)
		}
	}
	check("DaemonSet", b.daemonSet.Name, b.daemonSet.Namespace)
	if n := len(b.serviceMonitors) + len(b.prometheusRules); n > 0 {
		t.Errorf("the base renders %d monitoring objects: they belong in components/monitoring, which is opt-in", n)
	}
	for _, cm := range b.configMaps {
		check("ConfigMap", cm.Name, cm.Namespace)
		if cm.Annotations[localConfigKey] != "" {
			t.Errorf("ConfigMap/%s: local configuration was rendered", cm.Name)
		}
	}
	for _, s := range b.services {
		check("Service", s.Name, s.Namespace)
	}
	for _, sa := range b.serviceAccounts {
		check("ServiceAccount", sa.Name, sa.Namespace)
	}
	if b.daemonSet.Name != daemonSetName {
		t.Errorf("DaemonSet is named %q, want %q", b.daemonSet.Name, daemonSetName)
	}
	if len(names) != 4 {
		t.Errorf("rendered %v; want a DaemonSet, the proxy's ConfigMap, a Service and a ServiceAccount", names)
	}
}

func TestPod(t *testing.T) {
	b := render(t)
	ds := b.daemonSet
	pod := ds.Spec.Template.Spec

	if !pod.HostNetwork {
		t.Error("hostNetwork must be true: the address and rules belong to the node")
	}
	if pod.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy %q, want %q: cluster DNS may itself need the proxy", pod.DNSPolicy, corev1.DNSDefault)
	}
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", pod.PriorityClassName)
	}
	if !slices.ContainsFunc(pod.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Key == "" && tol.Operator == corev1.TolerationOpExists && tol.Effect == ""
	}) {
		t.Errorf("tolerations %+v: want one that tolerates every taint (operator: Exists, no key, no effect)", pod.Tolerations)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("automountServiceAccountToken must be false: the pod talks to no API")
	}
	if sa, ok := b.serviceAccounts[pod.ServiceAccountName]; !ok {
		t.Errorf("serviceAccountName %q is not rendered", pod.ServiceAccountName)
	} else if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Errorf("ServiceAccount %s must set automountServiceAccountToken: false", sa.Name)
	}
	if pod.SecurityContext == nil || pod.SecurityContext.SeccompProfile == nil ||
		pod.SecurityContext.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("pod securityContext.seccompProfile.type must be RuntimeDefault")
	}

	checkRollout(t, ds)
	// With hostNetwork every declared container port is also a host port,
	// and the surge pod could not be scheduled next to the old one.
	for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
		if len(c.Ports) > 0 {
			t.Errorf("container %s declares ports %+v: with hostNetwork and maxSurge the new pod would never be scheduled", c.Name, c.Ports)
		}
	}
	if len(pod.InitContainers) != 1 || pod.InitContainers[0].Name != setupName {
		t.Errorf("init containers %v, want exactly %q", containerNames(pod.InitContainers), setupName)
	}
	if got, want := containerNames(pod.Containers), []string{sidecarName, proxyName}; !slices.Equal(got, want) {
		t.Errorf("containers %v, want %v", got, want)
	}
	for _, c := range slices.Concat(pod.InitContainers, pod.Containers) {
		if !pinned(c.Image) {
			t.Errorf("container %s: image %q is not pinned by a tag or digest", c.Name, c.Image)
		}
	}
}

func TestSetupInitContainer(t *testing.T) {
	b := render(t)
	pod := b.daemonSet.Spec.Template.Spec
	setup := container(t, pod.InitContainers, setupName)
	sidecar := container(t, pod.Containers, sidecarName)
	if setup.Image != sidecar.Image {
		t.Errorf("init container image %q differs from the sidecar's %q", setup.Image, sidecar.Image)
	}
	flags := parseFlags(t, setup)
	want := map[string]string{
		"ip-address":     b.settings.addresses(),
		"port":           b.settings.Port,
		"interface":      interfaceName,
		"daemon":         "false",
		"setup-iptables": "true",
	}
	for name, v := range want {
		if flags[name] != v {
			t.Errorf("init container: --%s=%q, want %q", name, flags[name], v)
		}
	}
	for name := range flags {
		if _, ok := want[name]; !ok {
			t.Errorf("init container: unexpected flag --%s (it must only put the address and rules in place)", name)
		}
	}
}

func TestSidecarContainer(t *testing.T) {
	b := render(t)
	pod := b.daemonSet.Spec.Template.Spec
	c := container(t, pod.Containers, sidecarName)
	flags := parseFlags(t, c)

	if flags["ip-address"] != b.settings.addresses() || flags["port"] != b.settings.Port {
		t.Errorf("sidecar: --ip-address=%q --port=%q, want %q and %q from %s",
			flags["ip-address"], flags["port"], b.settings.addresses(), b.settings.Port, settingsFile)
	}
	if flags["interface"] != interfaceName {
		t.Errorf("sidecar: --interface=%q, want %q: a dummy link of its own, not lo", flags["interface"], interfaceName)
	}
	if v, ok := flags["daemon"]; ok && v != "true" {
		t.Errorf("sidecar: --daemon=%s, want daemon mode", v)
	}
	if flags["setup-iptables"] != "true" {
		t.Error("sidecar: want --setup-iptables")
	}
	// A rolling update must not remove what the new pod relies on.
	if v, ok := flags["cleanup"]; ok && v != "false" {
		t.Error("sidecar: --cleanup must not be set")
	}

	host, port := hostPort(t, "--health-probe-bind-address", flags["health-probe-bind-address"])
	if host != probeHost {
		t.Errorf("sidecar: health probes bound to %q, want %s", host, probeHost)
	}
	checkProbe(t, "sidecar liveness", c.LivenessProbe, "/healthz", port)
	checkProbe(t, "sidecar readiness", c.ReadinessProbe, "/readyz", port)

	_, mport := hostPort(t, "--metrics-bind-address", flags["metrics-bind-address"])
	var found bool
	for _, s := range b.services {
		for _, p := range s.Spec.Ports {
			if p.Name != metricsPort {
				continue
			}
			found = true
			if len(s.Spec.Selector) == 0 {
				t.Errorf("Service %s selects no pods", s.Name)
			}
			if p.TargetPort.String() != mport {
				t.Errorf("Service %s: port %q targets %s, but the sidecar serves metrics on %s", s.Name, metricsPort, p.TargetPort.String(), mport)
			}
			for k, v := range s.Spec.Selector {
				if b.daemonSet.Spec.Template.Labels[k] != v {
					t.Errorf("Service %s: selector %s=%s does not select the DaemonSet's pods", s.Name, k, v)
				}
			}
		}
	}
	if !found {
		t.Errorf("no Service names a port %q for scraping", metricsPort)
	}
}

func TestSecurity(t *testing.T) {
	b := render(t)
	pod := b.daemonSet.Spec.Template.Spec
	for _, c := range []*corev1.Container{container(t, pod.InitContainers, setupName), container(t, pod.Containers, sidecarName)} {
		checkSecurity(t, c, "NET_ADMIN", "NET_RAW")
		resources(t, c, "5m", "20Mi")
		if _, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
			t.Errorf("%s: no memory limit: an OOM kill would cut the node off the API server", c.Name)
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.MountPath == xtablesLock && volume(t, pod, m.Name).HostPath != nil
		}) {
			t.Errorf("%s: the host's %s is not mounted", c.Name, xtablesLock)
		}
	}
	checkSecurity(t, container(t, pod.Containers, proxyName), "NET_BIND_SERVICE")
	for _, v := range pod.Volumes {
		if hp := v.HostPath; hp != nil {
			if hp.Path != xtablesLock || hp.Type == nil || *hp.Type != corev1.HostPathFileOrCreate {
				t.Errorf("volume %s: hostPath %+v, want only %s with type FileOrCreate", v.Name, hp, xtablesLock)
			}
		}
	}
}

// TestProxy checks that the proxy listens where the sidecar puts the address
// and forwards to the upstream of config.yaml.
func TestProxy(t *testing.T) {
	b := render(t)
	pod := b.daemonSet.Spec.Template.Spec
	c := container(t, pod.Containers, proxyName)
	cfg := haproxyConfig(t, b.rendered, pod, c)
	env := environment(t, c)
	sections := parseHAProxy(t, cfg, env)

	binds := sections["frontend apiserver"]["bind"]
	for _, c := range []*corev1.Container{container(t, pod.InitContainers, setupName), container(t, pod.Containers, sidecarName)} {
		flags := parseFlags(t, c)
		if err := sameAddresses(flags["ip-address"], flags["port"], binds); err != nil {
			t.Errorf("%s (--ip-address=%s --port=%s) and haproxy (bind %q) disagree: %v", c.Name, flags["ip-address"], flags["port"], binds, err)
		}
	}
	if env["APISERVER_UPSTREAM"] != b.settings.Upstream {
		t.Errorf("proxy forwards to %q, want %q from %s", env["APISERVER_UPSTREAM"], b.settings.Upstream, settingsFile)
	}
	server := sections["backend apiserver"]["server"]
	if len(server) != 1 || !strings.HasPrefix(server[0], "apiserver "+b.settings.Upstream+" ") {
		t.Errorf("haproxy backend servers %q, want one forwarding to %s", server, b.settings.Upstream)
	}

	health := sections["frontend health"]["bind"]
	if len(health) != 1 {
		t.Fatalf("haproxy health frontend binds %q, want one address", health)
	}
	host, port := hostPort(t, "haproxy health bind", health[0])
	if host != probeHost {
		t.Errorf("haproxy health frontend bound to %q, want %s", host, probeHost)
	}
	checkProbe(t, "proxy liveness", c.LivenessProbe, "/healthz", port)
	checkProbe(t, "proxy readiness", c.ReadinessProbe, "/readyz", port)
}

// TestHAProxyAcceptsConfig runs `haproxy -c` on the rendered configuration
// with the proxy container's environment.
func TestHAProxyAcceptsConfig(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("haproxy must be installed in CI: %v", err)
		}
		t.Skipf("skipping: haproxy is not installed: %v", err)
	}
	b := render(t)
	pod := b.daemonSet.Spec.Template.Spec
	c := container(t, pod.Containers, proxyName)
	path := filepath.Join(t.TempDir(), haproxyCfgKey)
	if err := os.WriteFile(path, []byte(haproxyConfig(t, b.rendered, pod, c)), 0o644); err != nil {
		t.Fatal(err)
	}
	env := environment(t, c)
	// As rendered, and with the IPv6 addresses an IPv6-first cluster
	// writes into config.yaml (README.md: "that is the whole change").
	ipv6 := maps.Clone(env)
	ipv6["APISERVER_PROXY_ADDRESS"], ipv6["APISERVER_SERVICE_IP"] = "fd00:240::2", "fd00:10:96::1"
	for what, env := range map[string]map[string]string{"as rendered": env, "with IPv6 addresses": ipv6} {
		cmd := exec.Command("haproxy", "-c", "-f", path)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("haproxy -c, %s: %v\n%s", what, err, out)
			continue
		}
		// The example upstream has no address here, and this machine's
		// resolver may be unreachable; any other warning is a mistake in
		// the file.
		for line := range strings.Lines(string(out)) {
			if strings.Contains(line, "WARNING") &&
				!strings.Contains(line, "could not resolve address") &&
				!strings.Contains(line, "for nameserver") {
				t.Errorf("haproxy -c, %s: %s", what, strings.TrimSpace(line))
			}
		}
	}
}

// surge is the share of nodes updated at once, as README.md explains it.
const surge = "10%"

// checkRollout checks that every node keeps its proxy during a rolling
// update (the new pod first: maxUnavailable 0) and that the surge is a
// share of the nodes, so that a rollout takes about as many waves on ten
// nodes as on ten thousand.
func checkRollout(t *testing.T, ds *appsv1.DaemonSet) {
	t.Helper()
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil {
		t.Fatalf("updateStrategy %+v: want RollingUpdate", us)
	}
	ru := us.RollingUpdate
	if ru.MaxUnavailable == nil || ru.MaxUnavailable.String() != "0" {
		t.Errorf("maxUnavailable %v, want 0, so a node never goes without the proxy", ru.MaxUnavailable)
	}
	if ru.MaxSurge == nil || ru.MaxSurge.Type != intstr.String || ru.MaxSurge.String() != surge {
		t.Errorf("maxSurge %v, want %s: a count would take one wave per node (days on 10,000 nodes)", ru.MaxSurge, surge)
	}
	for _, n := range []int{1, 10, 100, 10_000} {
		got, err := intstr.GetScaledValueFromIntOrPercent(ru.MaxSurge, n, true)
		if err != nil || got < 1 {
			t.Errorf("maxSurge %v on %d nodes is %d (%v): the rollout would never start", ru.MaxSurge, n, got, err)
		}
	}
	if ds.Spec.MinReadySeconds != 0 {
		t.Errorf("minReadySeconds %d: README.md gives the rollout's duration without it", ds.Spec.MinReadySeconds)
	}
}

func container(t *testing.T, cs []corev1.Container, name string) *corev1.Container {
	t.Helper()
	for i := range cs {
		if cs[i].Name == name {
			return &cs[i]
		}
	}
	t.Fatalf("no container %q among %v", name, containerNames(cs))
	return nil
}

func containerNames(cs []corev1.Container) []string {
	var names []string
	for _, c := range cs {
		names = append(names, c.Name)
	}
	return names
}

func volume(t *testing.T, pod corev1.PodSpec, name string) *corev1.Volume {
	t.Helper()
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == name {
			return &pod.Volumes[i]
		}
	}
	t.Fatalf("no volume %q", name)
	return nil
}

// parseFlags reads a sidecar container's arguments as the sidecar would:
// --name=value, or --name alone for a boolean that is true.
func parseFlags(t *testing.T, c *corev1.Container) map[string]string {
	t.Helper()
	if len(c.Command) > 0 {
		t.Errorf("%s: command %q overrides the image's entry point", c.Name, c.Command)
	}
	flags := map[string]string{}
	for _, a := range c.Args {
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || name == "" {
			t.Fatalf("%s: argument %q is not a --flag", c.Name, a)
		}
		if !ok {
			value = "true"
		}
		if _, dup := flags[name]; dup {
			t.Errorf("%s: --%s given twice", c.Name, name)
		}
		flags[name] = value
	}
	return flags
}

func hostPort(t *testing.T, what, s string) (host, port string) {
	t.Helper()
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		t.Fatalf("%s %q: %v", what, s, err)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		t.Fatalf("%s %q: bad port", what, s)
	}
	return host, port
}

func checkProbe(t *testing.T, what string, p *corev1.Probe, path, port string) {
	t.Helper()
	if p == nil || p.HTTPGet == nil {
		t.Errorf("%s: want an HTTP probe", what)
		return
	}
	g := p.HTTPGet
	if g.Host != probeHost || g.Path != path || g.Port.String() != port {
		t.Errorf("%s probe: http://%s:%s%s, want http://%s:%s%s", what, g.Host, g.Port.String(), g.Path, probeHost, port, path)
	}
}

func checkSecurity(t *testing.T, c *corev1.Container, add ...corev1.Capability) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Errorf("%s: no securityContext", c.Name)
		return
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("%s: allowPrivilegeEscalation must be false", c.Name)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("%s: readOnlyRootFilesystem must be true", c.Name)
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("%s: must not be privileged", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: capabilities must drop ALL", c.Name)
		return
	}
	got := slices.Sorted(slices.Values(sc.Capabilities.Add))
	if want := slices.Sorted(slices.Values(add)); !slices.Equal(got, want) {
		t.Errorf("%s: adds capabilities %v, want exactly %v", c.Name, got, want)
	}
}

func resources(t *testing.T, c *corev1.Container, cpu, memory string) {
	t.Helper()
	for name, want := range map[corev1.ResourceName]string{corev1.ResourceCPU: cpu, corev1.ResourceMemory: memory} {
		got, ok := c.Resources.Requests[name]
		if !ok || got.Cmp(resource.MustParse(want)) != 0 {
			t.Errorf("%s: requests %s=%s, want %s", c.Name, name, got.String(), want)
		}
	}
}

// pinned reports whether an image names a tag other than latest, or a digest.
func pinned(image string) bool {
	if strings.Contains(image, "@sha256:") {
		return true
	}
	i := strings.LastIndex(image, ":")
	if i < 0 || strings.Contains(image[i:], "/") {
		return false
	}
	return image[i+1:] != "latest"
}

func environment(t *testing.T, c *corev1.Container) map[string]string {
	t.Helper()
	if len(c.EnvFrom) > 0 {
		t.Errorf("%s: envFrom hides where values come from; use env", c.Name)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			t.Errorf("%s: env %s comes from elsewhere; want a value from %s", c.Name, e.Name, settingsFile)
		}
		env[e.Name] = e.Value
	}
	return env
}

// haproxyConfig returns haproxy.cfg from the ConfigMap mounted where the
// proxy container reads it.
func haproxyConfig(t *testing.T, b *rendered, pod corev1.PodSpec, c *corev1.Container) string {
	t.Helper()
	i := slices.Index(c.Command, "-f")
	if i < 0 || i+1 >= len(c.Command) {
		t.Fatalf("%s: command %q names no configuration file (-f)", c.Name, c.Command)
	}
	path := c.Command[i+1]
	for _, m := range c.VolumeMounts {
		if filepath.Join(m.MountPath, haproxyCfgKey) != path {
			continue
		}
		v := volume(t, pod, m.Name)
		if v.ConfigMap == nil {
			t.Fatalf("volume %s mounted at %s is not a ConfigMap", v.Name, m.MountPath)
		}
		cm, ok := b.configMaps[v.ConfigMap.Name]
		if !ok {
			t.Fatalf("volume %s: ConfigMap %s is not rendered", v.Name, v.ConfigMap.Name)
		}
		cfg, ok := cm.Data[haproxyCfgKey]
		if !ok {
			t.Fatalf("ConfigMap %s has no %s", cm.Name, haproxyCfgKey)
		}
		return cfg
	}
	t.Fatalf("%s: no volume mounted where %s is read", c.Name, path)
	return ""
}

// parseHAProxy reads an haproxy configuration into section header ("frontend
// apiserver") → keyword → the rest of each line with that keyword, after
// expanding "${VAR}" from env and removing quotes. It understands only what
// this test asks of it.
func parseHAProxy(t *testing.T, cfg string, env map[string]string) map[string]map[string][]string {
	t.Helper()
	sections := map[string]map[string][]string{}
	var current map[string][]string
	sc := bufio.NewScanner(strings.NewReader(cfg))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		expanded, err := expand(line, env)
		if err != nil {
			t.Fatalf("haproxy.cfg: %q: %v", line, err)
		}
		fields := strings.Fields(strings.ReplaceAll(expanded, `"`, ""))
		if line[0] != ' ' && line[0] != '\t' {
			current = map[string][]string{}
			sections[strings.Join(fields, " ")] = current
			continue
		}
		if current == nil {
			t.Fatalf("haproxy.cfg: %q is outside any section", line)
		}
		current[fields[0]] = append(current[fields[0]], strings.Join(fields[1:], " "))
	}
	return sections
}

// expand replaces "${VAR}" as haproxy does; an unset variable is an error.
func expand(s string, env map[string]string) (string, error) {
	var err error
	out := os.Expand(s, func(name string) string {
		v, ok := env[name]
		if !ok {
			err = errors.Join(err, fmt.Errorf("${%s} is not set in the proxy's environment", name))
		}
		return v
	})
	return out, err
}
