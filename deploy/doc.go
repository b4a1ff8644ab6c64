// Package deploy holds the kustomize base that runs the sidecar, with a
// proxy, on every node of a cluster (base/), an opt-in monitoring component
// (components/monitoring/) and an overlay that removes everything from
// every node (uninstall/). It has no code: its tests render each of them
// the way `kubectl kustomize` does, decode every object strictly into the
// Kubernetes API types and prometheus-operator's, check what the manifests
// must guarantee, and run promtool on the alerts.
//
// It is a module of its own so that the sidecar's binary does not depend
// on the Kubernetes API types or on kustomize.
package deploy
