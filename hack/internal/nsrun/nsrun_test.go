package nsrun

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestOutcome(t *testing.T) {
	expired, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	interrupted, stop := context.WithCancel(context.Background())
	stop()
	boom := errors.New("boom")
	for _, tc := range []struct {
		name             string
		ctx              context.Context
		runErr, cleanErr error
		code             int
		ok               bool
	}{
		{"success", context.Background(), nil, nil, 0, true},
		{"run failed", context.Background(), boom, nil, 1, false},
		{"bound exceeded", expired, boom, nil, 1, false},
		{"interrupted", interrupted, boom, nil, 130, false},
		{"cleanup failed", context.Background(), nil, boom, 1, false},
	} {
		if code, ok := Outcome(tc.ctx, "test", time.Minute, tc.runErr, tc.cleanErr); code != tc.code || ok != tc.ok {
			t.Errorf("%s: %d, %v; want %d, %v", tc.name, code, ok, tc.code, tc.ok)
		}
	}
}
