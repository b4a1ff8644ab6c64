# The sidecar's image: a static binary on the Kubernetes project's
# distroless-iptables image, the base of kube-proxy. That image carries
# iptables and ip6tables for both backends (nft and legacy), each program
# under its own name, which the sidecar calls directly, and little else.
#
#   docker build --build-arg VERSION=$(git describe --tags --always) -t IMAGE .
#
# (`make image` does this.)

ARG GO_VERSION=1.26.8

# The build runs on the builder's platform and cross-compiles for the
# target's (docker buildx build --platform linux/amd64,linux/arm64 ...).
FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS build
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

FROM registry.k8s.io/build-image/distroless-iptables:v0.11.0
COPY --from=build /out/apiserver-proxy-sidecar /apiserver-proxy-sidecar
# No USER: the sidecar runs as root. It needs NET_ADMIN (and NET_RAW for the
# legacy backend) in the iptables programs it runs, and a non-root process
# cannot pass capabilities on to the programs it executes (Kubernetes sets
# no ambient capabilities). The manifests drop every other capability and
# forbid privilege escalation instead.
ENTRYPOINT ["/apiserver-proxy-sidecar"]
