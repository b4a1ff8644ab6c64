package apply

import (
	"context"
	"errors"
	"sync"
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

// While the sync loop is busy, a burst of one kind of trigger is kept as
// one, and a trigger of another kind is never lost behind it.
func TestForwardSetKeepsOneOfEachKind(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	out := make(chan Trigger) // nobody reads yet: the loop is busy
	send := forwardSet(ctx, &wg, out)
	for range 1000 {
		send(TriggerNFTables)
	}
	send(TriggerAddress)
	for range 1000 {
		send(TriggerNFTables)
	}
	got := map[Trigger]int{}
	for len(got) < 2 {
		select {
		case tr := <-out:
			got[tr]++
		case <-time.After(10 * time.Second):
			t.Fatalf("after 10s only %v arrived", got)
		}
	}
	// At most one more of each may still be in flight; drain without
	// waiting: nothing else may come.
	for {
		select {
		case tr := <-out:
			got[tr]++
			continue
		default:
		}
		break
	}
	if got[TriggerAddress] < 1 || got[TriggerNFTables] > 2 || got[TriggerAddress] > 2 {
		t.Errorf("triggers handed over: %v; want the address one, and at most two of each", got)
	}
}
