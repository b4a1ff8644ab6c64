package netnstest

import (
	"net"
	"sync"
	"testing"
)

// Serve accepts connections on ln until the test ends and runs handle on
// each in a goroutine of its own, closing the connection when handle
// returns. When the test ends it closes ln and every connection still
// open (a client whose close the firewall dropped would otherwise hold its
// handler), and waits for every handler to return. Listen inside the
// namespace with Do; ln stays there.
func Serve(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					_ = c.Close()
				}()
				handle(c)
			}()
		}
	}()
}
