package apply

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestResubscribeAfterError: a subscription that fails is made again, and
// every failure is followed by a trigger, since events were missed.
func TestResubscribeAfterError(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	subscriptions := 0
	held := make(chan struct{})
	triggers := make(chan Trigger, 10)
	send := func(tr Trigger) { triggers <- tr }
	done := make(chan struct{})
	go func() {
		Watchers{}.resubscribe(ctx, "test", TriggerAddress, send, func(ctx context.Context, send func(Trigger)) error {
			subscriptions++
			if subscriptions < 3 {
				return errors.New("receive failed: no buffer space available")
			}
			close(held) // the third one holds
			<-ctx.Done()
			return nil
		})
		close(done)
	}()
	for i := range 2 {
		select {
		case tr := <-triggers:
			if tr != TriggerAddress {
				t.Errorf("trigger %d = %q, want %q", i, tr, TriggerAddress)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no trigger after failure %d", i+1)
		}
	}
	select {
	case <-held:
	case <-time.After(10 * time.Second):
		t.Fatal("no third subscription after two failures")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("resubscribe did not return after cancel")
	}
	if subscriptions != 3 {
		t.Errorf("%d subscriptions, want 3", subscriptions)
	}
}
