// Package deploy is the kustomize base that runs the sidecar, with a proxy,
// on every node of a cluster. It has no code: its test renders the base the
// way `kubectl kustomize deploy/` does, decodes every object strictly into
// the Kubernetes API types and checks what the manifests must guarantee.
//
// It is a module of its own so that the sidecar's binary does not depend
// on the Kubernetes API types or on kustomize.
package deploy
