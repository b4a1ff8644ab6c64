// Package nsthread runs code on an OS thread switched into another network
// namespace, the one way a Go program opens a socket or starts a process
// there without leaving its own namespace.
package nsthread

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Run runs f on an OS thread switched into the network namespace target
// and returns f's error, or the error of switching. Sockets opened by f
// stay in the namespace after the thread switches back, and a process f
// starts starts there. If the thread cannot switch back it stays locked,
// so the Go runtime ends it with its goroutine instead of reusing it.
func Run(target netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("getting current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			// Keep the thread locked: it is still in the other namespace
			// and must die with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("leaving network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
