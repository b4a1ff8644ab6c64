# apiserver-proxy-sidecar: `make help` lists the targets.

BINARY   ?= apiserver-proxy-sidecar
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE    ?= apiserver-proxy-sidecar:$(VERSION)
GO       ?= go
FUZZTIME ?= 30s
SOAK_DURATION ?= 10m
MANIFESTS_DIR ?= deploy/

# Tools run with `go run` at a pinned version: nothing to install.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
KUSTOMIZE   ?= sigs.k8s.io/kustomize/kustomize/v5@v5.8.2
# promtool for the alerts' unit tests: in PATH, or the one
# `hack/promtool.sh` unpacks from Debian's prometheus package.
PROMTOOL    ?= promtool

.DEFAULT_GOAL := help
.PHONY: help build test test-short golden fuzz demo bench availability image manifests alerts verify clean soak

help: ## List the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z0-9-]+:.*## / { printf "  %-10s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

build: ## Build the static binary ./apiserver-proxy-sidecar
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BINARY) .

# The network-namespace tests (e2e/, and the root tests of apply/ and the
# other packages) run when root (they skip with a message otherwise, and
# fail instead of skipping when CI=true). deploy/ is a module of its own:
# `go test ./...` at the top does not enter it. On a machine busy with
# other work go test's default timeout of 10 minutes leaves too little room.
TEST_TIMEOUT ?= 30m

test: ## gofmt, go vet and every test (race detector; as root also in network namespaces), deploy/ too
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	cd deploy && $(GO) vet ./...
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...
	cd deploy && $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

test-short: ## The fast tests only (go test -short: every network-namespace test skips), no root needed, in seconds
	$(GO) test -short -count=1 ./...

golden: ## Rewrite golden/ from the templates (review the diff like code)
	$(GO) test ./render -run TestGolden -update

fuzz: ## Fuzz validation and rendering, the conntrack decoder and the legacy table walk, for FUZZTIME each (default 30s)
	$(GO) test ./render -run '^$$' -fuzz FuzzValidateRender -fuzztime $(FUZZTIME)
	$(GO) test ./internal/conntrack -run '^$$' -fuzz FuzzDecode -fuzztime $(FUZZTIME)
	$(GO) test ./internal/xtables -run '^$$' -fuzz FuzzWalk -fuzztime $(FUZZTIME)

# TestSoak runs only when SOAK_DURATION is set. The test timeout is the
# duration plus 5m: Go adds up a duration such as "10m5m".
soak: ## Soak the race-built daemon under random drift for SOAK_DURATION (default 10m; root)
	SOAK_DURATION=$(SOAK_DURATION) $(GO) test -race -count=1 -v -run '^TestSoak$$' -timeout $(SOAK_DURATION)5m ./e2e/

demo: ## Run the sidecar in a throwaway network namespace (root)
	GO="$(GO)" hack/demo.sh

# bench runs as root in network namespaces of its own and writes
# BENCHMARKS.md, the committed report. QUICK=1 measures fewer scenarios,
# fewer times, and writes bench-quick.md (git-ignored) instead, so that a
# quick look never replaces the full report; OUT=FILE writes FILE. OUT is
# not taken from the environment (plain =): only `make bench OUT=...` sets it.
OUT = $(if $(QUICK),bench-quick.md,BENCHMARKS.md)

bench: build ## Benchmark against per-rule checks and iptables-save, write OUT (root; default BENCHMARKS.md; QUICK=1: short, to bench-quick.md)
	$(GO) run ./hack/bench -bin ./$(BINARY) -out $(OUT) $(if $(QUICK),-quick)
	$(GO) test -run '^$$' -bench . -benchmem $(if $(QUICK),-benchtime=200ms) ./render ./apply

# availability runs as root in network namespaces of its own and writes
# AVAILABILITY.md, the committed report. QUICK=1 runs the short form
# (fewer repetitions, a shorter storm: about a minute) and writes
# availability-quick.md (git-ignored) instead; AVAIL_OUT=FILE writes FILE.
# It fails when a connection failed through a lifecycle event of the
# sidecar (kill, restart, update without --cleanup); CI runs QUICK=1.
AVAIL_OUT = $(if $(QUICK),availability-quick.md,AVAILABILITY.md)

availability: build ## Measure what clients feel through kills, updates, flushes and a writer storm, write AVAIL_OUT (root; QUICK=1: short)
	$(GO) run ./hack/availability -bin ./$(BINARY) -out $(AVAIL_OUT) $(if $(QUICK),-short)

image: ## Build the container image IMAGE with docker
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

# MANIFESTS_DIR=deploy/uninstall (or deploy/examples/monitoring) renders
# another kustomization.
manifests: ## Render deploy/ (or MANIFESTS_DIR) as `kubectl kustomize` does
	@$(GO) run $(KUSTOMIZE) build $(MANIFESTS_DIR)

# The alerts of deploy/components/monitoring, taken out of the
# PrometheusRule, through `promtool check rules` and `promtool test rules`,
# and the proof that a broken expression fails them. `make test` runs them
# too where promtool is found.
alerts: ## Unit-test the monitoring alerts with promtool (PROMTOOL=path; hack/promtool.sh gets one)
	cd deploy && PROMTOOL="$(if $(findstring /,$(PROMTOOL)),$(abspath $(PROMTOOL)),$(PROMTOOL))" $(GO) test -count=1 -run '^TestAlerts' ./...

verify: ## gofmt, go vet and staticcheck, on both modules
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	cd deploy && $(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	cd deploy && $(GO) run $(STATICCHECK) ./...

clean: ## Remove the binary
	rm -f $(BINARY)
