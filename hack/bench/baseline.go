package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
)

// The two designs operators otherwise run, as modes of this binary so that
// they pay the same Go start-up cost as the sidecar:
//
//   - baseline-percheck: the earlier upstream sidecar and node-local-dns.
//     Five rules straight in the built-in chains, each checked with
//     `iptables -C` and inserted with `-I` where missing.
//   - baseline-save: read each table with `iptables-save -t TABLE`, compare
//     with the five rules, insert what is missing.
//
// Both keep the address on lo the same way: list lo's addresses over
// netlink, add it if missing.

// baselineRule is one of the five rules, in a built-in chain.
type baselineRule struct {
	Table, Chain string
	Spec         []string
}

func baselineRules(ip string, port int) []baselineRule {
	p := strconv.Itoa(port)
	to := []string{"-d", ip + "/32", "-p", "tcp", "-m", "tcp", "--dport", p}
	from := []string{"-s", ip + "/32", "-p", "tcp", "-m", "tcp", "--sport", p}
	with := func(spec []string, target string) []string {
		return append(append([]string(nil), spec...), "-j", target)
	}
	return []baselineRule{
		{"raw", "PREROUTING", with(to, "NOTRACK")},
		{"raw", "OUTPUT", with(to, "NOTRACK")},
		{"raw", "OUTPUT", with(from, "NOTRACK")},
		{"filter", "INPUT", with(to, "ACCEPT")},
		{"filter", "OUTPUT", with(from, "ACCEPT")},
	}
}

// saveLine is the rule as iptables-save prints it.
func (r baselineRule) saveLine() string {
	return "-A " + r.Chain + " " + strings.Join(r.Spec, " ")
}

// baselineMain runs a baseline mode; args follow the mode's name.
func baselineMain(mode string, args []string) int {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	backend := fs.String("backend", "nft", "iptables backend: nft or legacy")
	ip := fs.String("ip", "10.96.0.2", "the address")
	port := fs.Int("port", 443, "the port")
	loop := fs.Int("loop", 1, "passes to run in this process")
	cleanup := fs.Bool("cleanup", false, "remove the rules and the address instead")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *backend != "nft" && *backend != "legacy" {
		fmt.Fprintf(os.Stderr, "%s: -backend must be nft or legacy\n", mode)
		return 2
	}
	b := baseline{iptables: "iptables-" + *backend, save: "iptables-" + *backend + "-save", ip: *ip, rules: baselineRules(*ip, *port)}
	var err error
	switch {
	case *cleanup:
		err = b.cleanup()
	case mode == "baseline-percheck":
		for i := 0; i < *loop && err == nil; i++ {
			err = b.perCheck()
		}
	case mode == "baseline-save":
		for i := 0; i < *loop && err == nil; i++ {
			err = b.saveCompare()
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
		return 1
	}
	return 0
}

type baseline struct {
	iptables, save string
	ip             string
	rules          []baselineRule
}

// perCheck checks each rule with -C and inserts it with -I where missing.
func (b baseline) perCheck() error {
	if err := b.ensureAddress(); err != nil {
		return err
	}
	for _, r := range b.rules {
		ok, err := b.check(r)
		if err != nil {
			return err
		}
		if !ok {
			if err := b.iptablesRun(append([]string{"-w", "5", "-t", r.Table, "-I", r.Chain}, r.Spec...)...); err != nil {
				return err
			}
		}
	}
	return nil
}

func (b baseline) check(r baselineRule) (bool, error) {
	err := b.iptablesRun(append([]string{"-w", "5", "-t", r.Table, "-C", r.Chain}, r.Spec...)...)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return false, nil
	}
	return err == nil, err
}

// saveCompare reads raw and filter with iptables-save, line by line, and
// inserts the rules it did not see.
func (b baseline) saveCompare() error {
	if err := b.ensureAddress(); err != nil {
		return err
	}
	for _, table := range []string{"raw", "filter"} {
		seen, err := b.saved(table)
		if err != nil {
			return err
		}
		for _, r := range b.rules {
			if r.Table == table && !seen[r.saveLine()] {
				if err := b.iptablesRun(append([]string{"-w", "5", "-t", r.Table, "-I", r.Chain}, r.Spec...)...); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// saved returns which of our rules `iptables-save -t table` lists.
func (b baseline) saved(table string) (map[string]bool, error) {
	want := map[string]bool{}
	for _, r := range b.rules {
		want[r.saveLine()] = true
	}
	cmd := exec.Command(b.save, "-t", table)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if line := sc.Text(); want[line] {
			seen[line] = true
		}
	}
	_, _ = io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("%s -t %s: %w: %s", b.save, table, err, strings.TrimSpace(stderr.String()))
	}
	return seen, sc.Err()
}

// cleanup deletes every copy of the rules and the address.
func (b baseline) cleanup() error {
	for _, r := range b.rules {
		for range 10 {
			if ok, err := b.check(r); err != nil || !ok {
				break
			}
			if err := b.iptablesRun(append([]string{"-w", "5", "-t", r.Table, "-D", r.Chain}, r.Spec...)...); err != nil {
				return err
			}
		}
	}
	lo, addr, err := b.address()
	if err != nil {
		return err
	}
	if found, err := hasAddress(lo, addr); err != nil || !found {
		return err
	}
	return netlink.AddrDel(lo, addr)
}

func (b baseline) address() (netlink.Link, *netlink.Addr, error) {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, nil, fmt.Errorf("link lo: %w", err)
	}
	ip := net.ParseIP(b.ip).To4()
	if ip == nil {
		return nil, nil, fmt.Errorf("%q is not an IPv4 address", b.ip)
	}
	return lo, &netlink.Addr{IPNet: &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)}}, nil
}

// ensureAddress lists lo's addresses and adds ours if missing.
func (b baseline) ensureAddress() error {
	lo, addr, err := b.address()
	if err != nil {
		return err
	}
	found, err := hasAddress(lo, addr)
	if err != nil || found {
		return err
	}
	if err := netlink.AddrAdd(lo, addr); err != nil {
		return fmt.Errorf("adding %s to lo: %w", addr.IPNet, err)
	}
	return nil
}

func hasAddress(link netlink.Link, addr *netlink.Addr) (bool, error) {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("listing addresses of lo: %w", err)
	}
	for _, a := range addrs {
		if a.IPNet.IP.Equal(addr.IP) {
			return true, nil
		}
	}
	return false, nil
}

func (b baseline) iptablesRun(args ...string) error {
	cmd := exec.Command(b.iptables, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 1 && len(args) > 4 && args[4] == "-C" {
			return err // a missing rule: the caller decides
		}
		return fmt.Errorf("%s %s: %w: %s", b.iptables, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
