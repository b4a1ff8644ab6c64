package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// MetricsHandler serves /metrics from the registry.
func (t *Telemetry) MetricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{
		Registry: t.registry, // counts its own errors there
		ErrorLog: errorLog{},
		Timeout:  metricsTimeout,
	}))
	return mux
}

// Server timeouts: the clients are the kubelet's probes and Prometheus, on
// the node or near it.
const (
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 60 * time.Second
	maxHeaderBytes    = 16 << 10
	metricsTimeout    = 20 * time.Second // below writeTimeout
)

// Listeners are the HTTP servers Start started.
type Listeners struct {
	servers         []*http.Server
	health, metrics net.Addr
	wg              sync.WaitGroup
}

// Start listens on healthAddr (for /healthz and /readyz) and metricsAddr
// (for /metrics), each only if it is neither "" nor "0", and serves them in
// the background until Shutdown. It listens before it returns: an address
// that cannot be listened on is its error, and nothing is left listening.
// The two addresses must not share a port.
//
// The listeners set SO_REUSEPORT: on a rolling update of a host-network
// DaemonSet the new pod listens next to the old one on the same port, as
// long as both set it, and the kernel spreads connections over both until
// the old one stops (so a probe or a scrape may be answered by either). A
// port held by a socket without SO_REUSEPORT, or by another user, is still
// an error.
func (t *Telemetry) Start(healthAddr, metricsAddr string) (*Listeners, error) {
	l := &Listeners{}
	for _, s := range []struct {
		what, addr string
		handler    http.Handler
		bound      *net.Addr
	}{{"health", healthAddr, t.HealthHandler(), &l.health}, {"metrics", metricsAddr, t.MetricsHandler(), &l.metrics}} {
		if s.addr == "" || s.addr == "0" {
			continue
		}
		ln, err := listen(s.addr)
		if err != nil {
			for _, srv := range l.servers {
				_ = srv.Close()
			}
			l.wg.Wait()
			return nil, fmt.Errorf("serving %s on %s: %w", s.what, s.addr, err)
		}
		srv := &http.Server{
			Handler:           s.handler,
			ReadHeaderTimeout: readHeaderTimeout,
			ReadTimeout:       readTimeout,
			WriteTimeout:      writeTimeout,
			IdleTimeout:       idleTimeout,
			MaxHeaderBytes:    maxHeaderBytes,
			ErrorLog:          klog.NewStandardLogger("WARNING"),
		}
		l.servers = append(l.servers, srv)
		*s.bound = ln.Addr()
		l.wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "HTTP server stopped", "serving", s.what, "address", ln.Addr().String())
			}
		})
	}
	return l, nil
}

// listen listens on addr with SO_REUSEPORT.
func listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}

// HealthAddr is the address /healthz and /readyz are served on, nil when
// they are not.
func (l *Listeners) HealthAddr() net.Addr { return l.health }

// MetricsAddr is the address /metrics is served on, nil when it is not.
func (l *Listeners) MetricsAddr() net.Addr { return l.metrics }

// Shutdown stops listening, lets requests in progress finish until ctx is
// done, then closes what is left. It returns when every server has stopped.
func (l *Listeners) Shutdown(ctx context.Context) error {
	errs := make([]error, len(l.servers))
	var wg sync.WaitGroup
	for i, srv := range l.servers {
		wg.Go(func() {
			if err := srv.Shutdown(ctx); err != nil {
				errs[i] = errors.Join(err, srv.Close())
			}
		})
	}
	wg.Wait()
	l.wg.Wait()
	return errors.Join(errs...)
}

// errorLog sends promhttp's errors to klog.
type errorLog struct{}

func (errorLog) Println(v ...any) { klog.ErrorS(errors.New(fmt.Sprint(v...)), "Serving metrics") }
