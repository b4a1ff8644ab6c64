// Command tcpecho is the stand-in proxy and client of the demo
// (hack/demo.sh): with -listen it answers every line it receives on a TCP
// address, with -dial it sends one line there and prints the answer.
//
// The server stops by itself after -for, so a demo that is interrupted
// leaves nothing running.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	listen := flag.String("listen", "", "serve on this host:port")
	serveFor := flag.Duration("for", time.Minute, "with -listen: stop after this long")
	dial := flag.String("dial", "", "send one line to this host:port and print the answer")
	send := flag.String("send", "ping", "with -dial: the line to send")
	flag.Parse()

	var err error
	switch {
	case *listen != "" && *dial == "":
		err = serve(*listen, *serveFor)
	case *dial != "" && *listen == "":
		err = roundTrip(*dial, *send)
	default:
		err = errors.New("give either -listen or -dial")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcpecho: %v\n", err)
		os.Exit(1)
	}
}

func serve(addr string, d time.Duration) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("tcpecho: listening on %s\n", ln.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go answer(conn)
	}
}

func answer(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return
	}
	fmt.Fprintf(conn, "%s from %s\n", strings.TrimSpace(line), conn.LocalAddr())
}

func roundTrip(addr, text string) error {
	conn, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "%s\n", text); err != nil {
		return err
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	fmt.Printf("%s -> %s: sent %q, got %q\n", conn.LocalAddr(), addr, text, strings.TrimSpace(reply))
	return nil
}
