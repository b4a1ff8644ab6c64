module github.com/apiserver-proxy/apiserver-proxy-sidecar

go 1.26.8

require (
	github.com/google/go-cmp v0.7.0
	github.com/spf13/pflag v1.0.10
	github.com/vishvananda/netlink v1.3.1
	github.com/vishvananda/netns v0.0.5
	golang.org/x/sys v0.10.0
	k8s.io/klog/v2 v2.140.0
	k8s.io/utils v0.0.0-20261023123148-ca04ba58ecab
)

require github.com/go-logr/logr v1.4.1 // indirect
