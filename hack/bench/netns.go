package main

import "github.com/apiserver-proxy/apiserver-proxy-sidecar/hack/internal/nsrun"

// harness creates the benchmark's namespaces (apbench-<pid>-<n>) and starts
// its programs in them (nsrun); the client paths add their own methods.
type harness struct{ *nsrun.Harness }

// namespace is a network namespace the harness created.
type namespace = nsrun.Namespace

func newHarness(env []string) *harness { return &harness{nsrun.New("apbench", env)} }
