package main

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
)

// TestDockerfile keeps the image buildable: the builder's Go is the
// version go.mod names, and the base image is pinned to a tag and a digest.
func TestDockerfile(t *testing.T) {
	if err := checkDockerfile(readFile(t, "Dockerfile"), readFile(t, "go.mod")); err != nil {
		t.Error(err)
	}
}

// TestCheckDockerfileCatchesDrift proves that the check fails on each way
// the Dockerfile can fall out of step.
func TestCheckDockerfileCatchesDrift(t *testing.T) {
	const goMod = "module example.com/x\n\ngo 1.26.8\n"
	good := "ARG GO_VERSION=1.26.8\n" +
		"FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build\n" +
		"RUN go build .\n" +
		"FROM registry.k8s.io/build-image/distroless-iptables:v0.9.6@sha256:" + strings.Repeat("a", 64) + "\n"
	if err := checkDockerfile(good, goMod); err != nil {
		t.Fatalf("a Dockerfile in step with go.mod: %v", err)
	}
	for _, tc := range []struct {
		name, dockerfile, goMod, want string
	}{
		{"go.mod moved on", good, "module example.com/x\n\ngo 1.27.1\n", `GO_VERSION=1.26.8, but go.mod says go 1.27.1`},
		{"Dockerfile moved on", strings.Replace(good, "GO_VERSION=1.26.8", "GO_VERSION=1.26.9", 1), goMod, `GO_VERSION=1.26.9, but go.mod says go 1.26.8`},
		{"builder ignores the ARG", strings.Replace(good, "golang:${GO_VERSION}-bookworm", "golang:1.26.8-bookworm", 1), goMod, "builder is not golang:${GO_VERSION}-"},
		{"no ARG", strings.Replace(good, "ARG GO_VERSION=1.26.8\n", "", 1), goMod, "no ARG GO_VERSION"},
		{"no go line", good, "module example.com/x\n", "no go line"},
		{"base by tag only", strings.Replace(good, "@sha256:"+strings.Repeat("a", 64), "", 1), goMod, "not pinned to a tag and a digest"},
		{"base latest", strings.Replace(good, "v0.9.6@", "latest@", 1), goMod, "not pinned to a tag and a digest"},
		{"other base", strings.Replace(good, "registry.k8s.io/build-image/distroless-iptables", "debian", 1), goMod, "final stage is"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkDockerfile(tc.dockerfile, tc.goMod)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

var (
	goVersionArg = regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)$`)
	goModGoLine  = regexp.MustCompile(`(?m)^go (\S+)$`)
	fromLine     = regexp.MustCompile(`(?m)^FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?$`)
	// distroless is the base the README and the image's programs rely on,
	// pinned to a release tag and a digest.
	distroless = regexp.MustCompile(`^registry\.k8s\.io/build-image/distroless-iptables:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}$`)
)

// checkDockerfile reports how dockerfile falls out of step with goMod.
func checkDockerfile(dockerfile, goMod string) error {
	var errs []string
	arg := goVersionArg.FindStringSubmatch(dockerfile)
	gomod := goModGoLine.FindStringSubmatch(goMod)
	switch {
	case arg == nil:
		errs = append(errs, "Dockerfile: no ARG GO_VERSION=")
	case gomod == nil:
		errs = append(errs, "go.mod: no go line")
	case arg[1] != gomod[1]:
		errs = append(errs, fmt.Sprintf("Dockerfile: GO_VERSION=%s, but go.mod says go %s: the image would be built with another Go than the tests", arg[1], gomod[1]))
	}
	froms := fromLine.FindAllStringSubmatch(dockerfile, -1)
	if len(froms) != 2 {
		return fmt.Errorf("%s", strings.Join(append(errs, fmt.Sprintf("Dockerfile: %d FROM lines, want a builder and the final stage", len(froms))), "; "))
	}
	if !strings.HasPrefix(froms[0][1], "golang:${GO_VERSION}-") {
		errs = append(errs, fmt.Sprintf("Dockerfile: builder is not golang:${GO_VERSION}-<debian release> but %s", froms[0][1]))
	}
	switch final := froms[1][1]; {
	case !strings.HasPrefix(final, "registry.k8s.io/build-image/distroless-iptables:"):
		errs = append(errs, fmt.Sprintf("Dockerfile: final stage is %s, not distroless-iptables, whose programs of both backends the sidecar runs", final))
	case !distroless.MatchString(final):
		errs = append(errs, fmt.Sprintf("Dockerfile: base %s is not pinned to a tag and a digest", final))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}
