// Package xtables reads the legacy iptables (x_tables) rules of a network
// namespace in-process, over the getsockopt interface iptables-legacy-save
// uses: IPT_SO_GET_INFO for a table's size and layout, which costs
// microseconds, and IPT_SO_GET_ENTRIES for the table itself, which the
// kernel hands over whole.
//
// It recognises only what it is told to look for, exactly in the form
// iptables-legacy 1.8.9 writes it; anything else is reported as not
// recognised, so that a caller can ask iptables-legacy-save, which knows
// every match and target, instead. It never writes: iptables-legacy-restore
// owns the format, the counters and the xtables lock.
package xtables

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/apiserver-proxy/apiserver-proxy-sidecar/internal/nsthread"
)

// Family is an address family of x_tables: ip_tables or ip6_tables.
type Family int

// The families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// The getsockopt options (linux/netfilter_ipv4/ip_tables.h, ip6_tables.h:
// IPT_BASE_CTL 64, the same numbers for IPv6).
const (
	soGetInfo    = 64
	soGetEntries = 65
)

// tableNameLen is XT_TABLE_MAXNAMELEN.
const tableNameLen = 32

// numHooks is NF_INET_NUMHOOKS.
const numHooks = 5

// infoSize is sizeof(struct ipt_getinfo), the same for IPv6.
const infoSize = tableNameLen + 4 + 4*numHooks + 4*numHooks + 4 + 4

// entriesHeader is sizeof(struct ipt_get_entries): the name, the size, and
// padding to the 8-byte alignment of the entries that follow.
const entriesHeader = 40

// ErrNoTable is returned for a table the kernel does not list in
// /proc/net/ip_tables_names (ip6_tables_names): it holds no rules, and
// naming it in a getsockopt would load its module and create it.
var ErrNoTable = errors.New("table not loaded")

// TableInfo is what IPT_SO_GET_INFO tells of a table. Adding, deleting or
// replacing a rule, and flushing a chain, changes NumEntries or Size, and
// usually the offsets; a replacement with a table of exactly the same
// layout changes none of them.
type TableInfo struct {
	// ValidHooks has bit h set for each built-in chain (netfilter hook h)
	// the table has.
	ValidHooks uint32
	// HookEntry and Underflow are the offsets of each built-in chain's
	// first rule and of its policy.
	HookEntry, Underflow [numHooks]uint32
	// NumEntries counts every entry: rules, policies, chain heads and ends.
	NumEntries uint32
	// Size is the size of the entries in bytes.
	Size uint32
}

// Socket reads the x_tables of one family in one network namespace. It is
// not safe for concurrent use.
type Socket struct {
	family Family
	fd     int
	names  *os.File
	// current is set for a socket of the process's own namespace, whose
	// /proc/net any thread reads.
	current bool
}

// Open opens a raw socket (which needs CAP_NET_RAW; reading needs
// CAP_NET_ADMIN) for family f in network namespace ns (netns.None(): the
// current one). The socket stays in that namespace.
func Open(ns netns.NsHandle, f Family) (*Socket, error) {
	s := &Socket{family: f, fd: -1, current: !ns.IsOpen()}
	err := inNamespace(ns, func() error {
		domain := unix.AF_INET
		names := "ip_tables_names"
		if f == IPv6 {
			domain, names = unix.AF_INET6, "ip6_tables_names"
		}
		fd, err := unix.Socket(domain, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("opening a raw %s socket: %w", f, err)
		}
		s.fd = fd
		// The thread's own view of /proc/net: the namespace it is in now.
		// A file opened here keeps showing this namespace's tables.
		file, err := os.Open("/proc/thread-self/net/" + names)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("opening the list of %s tables: %w", f, err)
		}
		s.names = file
		return nil
	})
	if err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the socket.
func (s *Socket) Close() error {
	var errs []error
	if s.fd >= 0 {
		errs = append(errs, unix.Close(s.fd))
		s.fd = -1
	}
	if s.names != nil {
		errs = append(errs, s.names.Close())
		s.names = nil
	}
	return errors.Join(errs...)
}

// Family is the family s reads.
func (s *Socket) Family() Family { return s.family }

// Tables returns the tables the kernel lists for s's family: those that
// exist in s's namespace. None when the family's module is not loaded.
func (s *Socket) Tables() (map[string]bool, error) {
	tables := map[string]bool{}
	if s.names == nil {
		// Opened before the module was loaded: look again.
		return tables, s.reopenNames()
	}
	var buf [512]byte
	var text []byte
	for off := int64(0); ; {
		n, err := s.names.ReadAt(buf[:], off)
		text = append(text, buf[:n]...)
		off += int64(n)
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, fmt.Errorf("reading the list of %s tables: %w", s.family, err)
		}
	}
	for _, t := range strings.Fields(string(text)) {
		tables[t] = true
	}
	return tables, nil
}

// reopenNames is for a socket opened before the family's tables existed:
// the list file appears when the module is loaded.
func (s *Socket) reopenNames() error {
	// /proc/thread-self/net/ follows the thread's namespace; the socket's
	// namespace is reached through the socket itself.
	name := "ip_tables_names"
	if s.family == IPv6 {
		name = "ip6_tables_names"
	}
	if s.current {
		return s.openNames("/proc/net/" + name)
	}
	nsFD, err := unix.IoctlRetInt(s.fd, unix.SIOCGSKNS)
	if err != nil {
		return fmt.Errorf("finding the namespace of the %s socket: %w", s.family, err)
	}
	ns := netns.NsHandle(nsFD)
	defer ns.Close()
	return inNamespace(ns, func() error { return s.openNames("/proc/thread-self/net/" + name) })
}

func (s *Socket) openNames(path string) error {
	file, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening the list of %s tables: %w", s.family, err)
	}
	s.names = file
	return nil
}

// Info returns what the kernel tells of table without handing it over: a
// few microseconds. It returns ErrNoTable, without asking the kernel, for a
// table Tables does not list.
func (s *Socket) Info(table string) (TableInfo, error) {
	if err := s.exists(table); err != nil {
		return TableInfo{}, err
	}
	return s.info(table)
}

func (s *Socket) exists(table string) error {
	if len(table) >= tableNameLen {
		return fmt.Errorf("table name %q: longer than %d bytes", table, tableNameLen-1)
	}
	tables, err := s.Tables()
	if err != nil {
		return err
	}
	if !tables[table] {
		return fmt.Errorf("%s table %s: %w", s.family, table, ErrNoTable)
	}
	return nil
}

func (s *Socket) info(table string) (TableInfo, error) {
	var buf [infoSize]byte
	copy(buf[:tableNameLen], table)
	if err := s.getsockopt(soGetInfo, buf[:]); err != nil {
		return TableInfo{}, fmt.Errorf("getting the info of %s table %s: %w", s.family, table, err)
	}
	return parseInfo(buf[:]), nil
}

func parseInfo(b []byte) TableInfo {
	u32 := func(off int) uint32 { return binary.NativeEndian.Uint32(b[off:]) }
	var in TableInfo
	in.ValidHooks = u32(tableNameLen)
	for h := range numHooks {
		in.HookEntry[h] = u32(tableNameLen + 4 + 4*h)
		in.Underflow[h] = u32(tableNameLen + 4 + 4*numHooks + 4*h)
	}
	in.NumEntries = u32(tableNameLen + 4 + 8*numHooks)
	in.Size = u32(tableNameLen + 4 + 8*numHooks + 4)
	return in
}

// maxRetries bounds how often Entries asks again when the table changed
// between reading its size and reading its entries.
const maxRetries = 8

// Entries hands table's entries, and the info they go with, to use, and
// frees them when use returns: a table with tens of thousands of rules
// takes tens of megabytes, which are mapped for this read only and never
// kept by the Go heap. use must not keep b or any slice of it. It returns
// ErrNoTable for a table Tables does not list.
func (s *Socket) Entries(table string, use func(in TableInfo, b []byte) error) error {
	if err := s.exists(table); err != nil {
		return err
	}
	for range maxRetries {
		in, err := s.info(table)
		if err != nil {
			return err
		}
		n := entriesHeader + int(in.Size)
		buf, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return fmt.Errorf("mapping %d bytes for %s table %s: %w", n, s.family, table, err)
		}
		copy(buf[:tableNameLen], table)
		binary.NativeEndian.PutUint32(buf[tableNameLen:], in.Size)
		err = s.getsockopt(soGetEntries, buf)
		if errors.Is(err, unix.EAGAIN) {
			// The table changed size since info: ask again.
			_ = unix.Munmap(buf)
			continue
		}
		if err != nil {
			_ = unix.Munmap(buf)
			return fmt.Errorf("getting the entries of %s table %s: %w", s.family, table, err)
		}
		err = use(in, buf[entriesHeader:])
		if uerr := unix.Munmap(buf); uerr != nil && err == nil {
			err = fmt.Errorf("unmapping the entries of %s table %s: %w", s.family, table, uerr)
		}
		return err
	}
	return fmt.Errorf("getting the entries of %s table %s: it kept changing while being read", s.family, table)
}

func (s *Socket) getsockopt(opt int, buf []byte) error {
	level := unix.SOL_IP
	if s.family == IPv6 {
		level = unix.SOL_IPV6
	}
	n := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	runtime.KeepAlive(buf)
	if errno != 0 {
		return errno
	}
	if int(n) != len(buf) {
		return fmt.Errorf("the kernel answered %d bytes, not %d", n, len(buf))
	}
	return nil
}

// inNamespace runs f on a thread in network namespace ns (netns.None():
// the current thread, unchanged).
func inNamespace(ns netns.NsHandle, f func() error) error {
	if !ns.IsOpen() {
		return f()
	}
	return nsthread.Run(ns, f)
}
