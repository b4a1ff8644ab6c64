# apiserver-proxy-sidecar

BINARY   ?= apiserver-proxy-sidecar
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO       ?= go
FUZZTIME ?= 30s

.PHONY: all build test golden fuzz vet fmt clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BINARY) .

# Unit tests everywhere; the network-namespace tests run when root (they
# skip with a message otherwise, and fail instead of skipping when CI=true).
test: vet
	$(GO) test -race -count=1 ./...

vet:
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# Rewrite golden/ from the templates; review the diff like code.
golden:
	$(GO) test ./render -run TestGolden -update

# Bounded fuzzing of validation and rendering.
fuzz:
	$(GO) test ./render -run '^$$' -fuzz FuzzValidateRender -fuzztime $(FUZZTIME)

clean:
	rm -f $(BINARY)
