package telemetry

import (
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Live reports whether the sync loop is alive: a sync finished, whatever
// its result, less than 2*SyncInterval + LivenessSlack ago, or the process
// started less than that ago. When not, the error says for how long.
func (t *Telemetry) Live() error {
	t.mu.Lock()
	last := t.lastSync
	t.mu.Unlock()
	now := t.clock.Now()
	if last.IsZero() {
		if since := now.Sub(t.started); since >= t.liveness {
			return fmt.Errorf("no sync has finished in the %s since start (limit %s)", since.Round(time.Second), t.liveness)
		}
		return nil
	}
	if since := now.Sub(last); since >= t.liveness {
		return fmt.Errorf("the last sync finished %s ago (limit %s)", since.Round(time.Second), t.liveness)
	}
	return nil
}

// Ready returns nil once a sync has finished and while the latest one
// succeeded, which means that the address, and the rules where they are
// managed, were in place at its end. Otherwise it returns the reasons, one
// line each.
func (t *Telemetry) Ready() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lastSync.IsZero() {
		return []string{"no sync has finished yet"}
	}
	var reasons []string
	for _, err := range []error{t.latest.Address, t.latest.Rules} {
		if err == nil {
			continue
		}
		errs := []error{err}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			errs = j.Unwrap() // the rules of each family, each on its own line
		}
		for _, e := range errs {
			reasons = append(reasons, oneLine(e.Error()))
		}
	}
	return reasons
}

// oneLine folds every run of white space, line breaks included (the
// iptables programs' stderr has them), into one space.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// HealthHandler serves /healthz (Live) and /readyz (Ready): 200 and "ok",
// or 500 (/healthz) or 503 (/readyz) with the reasons, as plain text.
func (t *Telemetry) HealthHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := t.Live(); err != nil {
			plain(w, http.StatusInternalServerError, []string{err.Error()})
			return
		}
		plain(w, http.StatusOK, []string{"ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if reasons := t.Ready(); len(reasons) > 0 {
			plain(w, http.StatusServiceUnavailable, reasons)
			return
		}
		plain(w, http.StatusOK, []string{"ok"})
	})
	return mux
}

func plain(w http.ResponseWriter, code int, lines []string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	_, _ = fmt.Fprint(w, strings.Join(lines, "\n")+"\n")
}
