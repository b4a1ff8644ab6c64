# The sidecar's image: a static binary on the Kubernetes project's
# distroless-iptables image, the base of kube-proxy. That image carries
# iptables and ip6tables for both backends (nft and legacy), each program
# under its own name, which the sidecar calls directly, and little else:
# iptables-nft and iptables-nft-restore, iptables-legacy-save and
# iptables-legacy-restore, and the same four for ip6tables.
#
#   docker build --build-arg VERSION=$(git describe --tags --always) -t IMAGE .
#
# (`make image` does this.)

# Go's version for the build: the `go` line of go.mod, which
# dockerfile_test.go keeps it equal to.
ARG GO_VERSION=1.26.8

# The build runs on the builder's platform and cross-compiles for the
# target's (docker buildx build --platform linux/amd64,linux/arm64 ...).
# The Debian release is named, so that the builder does not change under a
# rebuild of the same tag.
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
# Modules first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG TARGETOS
ARG TARGETARCH
# Static (no cgo), without local paths, stamped with the version that the
# start-up log line reports.
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
    -o /out/apiserver-proxy-sidecar .

# v0.9.6 is listed in kubernetes/release,
# images/build/distroless-iptables/variants.yaml (distroless-bookworm:
# debian:bookworm-slim with Debian's iptables 1.8.9, built with Go 1.26),
# the newest tag there in the copy we read. The digest is the one other
# projects pin for the same tag (Azure/kube-egress-gateway,
# docker/gwdaemon.Dockerfile; kumahq/kuma), so a tag moved later cannot
# change what this file builds.
FROM registry.k8s.io/build-image/distroless-iptables:v0.9.6@sha256:33f27a340efd1f0a0341bd85755f1752af00b27debaf2f2876a3ef5dcc07f84a
COPY --from=build /out/apiserver-proxy-sidecar /apiserver-proxy-sidecar
# No USER: the sidecar runs as root. It needs NET_ADMIN (and NET_RAW for the
# legacy backend) in the iptables programs it runs, and a non-root process
# cannot pass capabilities on to the programs it executes (Kubernetes sets
# no ambient capabilities). The manifests drop every other capability and
# forbid privilege escalation instead.
ENTRYPOINT ["/apiserver-proxy-sidecar"]
