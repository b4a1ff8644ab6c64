package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Constants of <linux/taskstats.h> (struct version 13).
const (
	taskstatsCmdGet             = 1
	taskstatsCmdNew             = 2
	taskstatsTypePID            = 1
	taskstatsTypeTGID           = 2
	taskstatsTypeStats          = 3
	taskstatsTypeAggrPID        = 4
	taskstatsTypeAggrTGID       = 5
	taskstatsAttrRegisterCPUs   = 3
	taskstatsAttrDeregisterCPUs = 4
	genlHeaderLen               = 4
)

// Offsets into struct taskstats (offsetof on x86_64 and arm64, version 13).
const (
	offVersion    = 0
	offRunReal    = 64 // cpu_run_real_total: ns on CPU, from the scheduler
	offComm       = 80
	commLen       = 32
	offPID        = 128
	offPPID       = 132
	offUTime      = 152
	offSTime      = 160
	offHiwaterRSS = 200
	offTGID       = 368 // ac_tgid, since struct version 12
	offExeInode   = 392 // ac_exe_inode, since struct version 13
	minStatsLen   = offHiwaterRSS + 8
)

// taskRecord is the accounting record the kernel sends when a task (a
// thread) exits.
type taskRecord struct {
	PID  uint32 // the task (thread) id
	TGID uint32 // its process; 0 when the kernel's struct has no ac_tgid
	PPID uint32 // the process id of its parent
	Comm string
	// UTime and STime are the task's own CPU times, sampled at the tick
	// (4 ms here) unless the kernel accounts at every context switch.
	UTime, STime time.Duration
	// RunTime is the task's time on CPU as the scheduler counts it
	// (sum_exec_runtime, in ns): exact. 0 where the kernel leaves it out.
	RunTime time.Duration
	// HiwaterRSSKB is the peak RSS of the task's address space, in KiB.
	HiwaterRSSKB uint64
	// ExeInode is the inode of the task's program; 0 where unknown.
	ExeInode uint64
}

// cpu is the task's CPU time: the scheduler's exact figure where the
// kernel gives it, else user plus system time.
func (r taskRecord) cpu() time.Duration {
	if r.RunTime > 0 {
		return r.RunTime
	}
	return r.UTime + r.STime
}

// process returns the process the record's task belongs to.
func (r taskRecord) process() uint32 {
	if r.TGID != 0 {
		return r.TGID
	}
	return r.PID
}

// parseTaskstats parses the netlink messages in b (one datagram) and
// returns the per-task exit records in them. Per-process aggregates
// (TASKSTATS_TYPE_AGGR_TGID) are skipped: the per-task records already
// carry everything, and the aggregate holds only delay accounting.
func parseTaskstats(b []byte) ([]taskRecord, error) {
	var out []taskRecord
	for len(b) >= unix.NLMSG_HDRLEN {
		n := int(binary.NativeEndian.Uint32(b[0:4]))
		typ := binary.NativeEndian.Uint16(b[4:6])
		if n < unix.NLMSG_HDRLEN || n > len(b) {
			return out, fmt.Errorf("netlink message length %d out of range (%d bytes left)", n, len(b))
		}
		msg := b[unix.NLMSG_HDRLEN:n]
		b = b[min(nlmAlign(n), len(b)):]
		switch typ {
		case unix.NLMSG_DONE, unix.NLMSG_NOOP:
			continue
		case unix.NLMSG_ERROR:
			if len(msg) >= 4 {
				if errno := int32(binary.NativeEndian.Uint32(msg[0:4])); errno != 0 {
					return out, fmt.Errorf("taskstats: %w", unix.Errno(-errno))
				}
			}
			continue
		}
		if len(msg) < genlHeaderLen || msg[0] != taskstatsCmdNew {
			continue
		}
		err := walkAttrs(msg[genlHeaderLen:], func(typ uint16, data []byte) error {
			if typ != taskstatsTypeAggrPID {
				return nil
			}
			return walkAttrs(data, func(typ uint16, data []byte) error {
				if typ != taskstatsTypeStats {
					return nil
				}
				r, err := parseStats(data)
				if err != nil {
					return err
				}
				out = append(out, r)
				return nil
			})
		})
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// parseStats reads the fields we use from a struct taskstats.
func parseStats(d []byte) (taskRecord, error) {
	if len(d) < minStatsLen {
		return taskRecord{}, fmt.Errorf("struct taskstats of %d bytes, want at least %d", len(d), minStatsLen)
	}
	u32 := func(off int) uint32 { return binary.NativeEndian.Uint32(d[off:]) }
	u64 := func(off int) uint64 { return binary.NativeEndian.Uint64(d[off:]) }
	comm := d[offComm : offComm+commLen]
	if i := bytes.IndexByte(comm, 0); i >= 0 {
		comm = comm[:i]
	}
	r := taskRecord{
		PID:          u32(offPID),
		PPID:         u32(offPPID),
		Comm:         string(comm),
		UTime:        time.Duration(u64(offUTime)) * time.Microsecond,
		STime:        time.Duration(u64(offSTime)) * time.Microsecond,
		HiwaterRSSKB: u64(offHiwaterRSS),
		RunTime:      time.Duration(u64(offRunReal)),
	}
	if binary.NativeEndian.Uint16(d[offVersion:]) >= 12 && len(d) >= offTGID+4 {
		r.TGID = u32(offTGID)
	}
	if binary.NativeEndian.Uint16(d[offVersion:]) >= 13 && len(d) >= offExeInode+8 {
		r.ExeInode = u64(offExeInode)
	}
	return r, nil
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
func nlaAlign(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }

// walkAttrs calls f for each netlink attribute in b.
func walkAttrs(b []byte, f func(typ uint16, data []byte) error) error {
	for len(b) >= unix.SizeofNlAttr {
		n := int(binary.NativeEndian.Uint16(b[0:2]))
		typ := binary.NativeEndian.Uint16(b[2:4]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if n < unix.SizeofNlAttr || n > len(b) {
			return fmt.Errorf("netlink attribute length %d out of range (%d bytes left)", n, len(b))
		}
		if err := f(typ, b[unix.SizeofNlAttr:n]); err != nil {
			return err
		}
		b = b[min(nlaAlign(n), len(b)):]
	}
	return nil
}

// taskstatsRequest builds the generic netlink request that registers (or
// deregisters) a listener for exit records on cpus ("0-1").
func taskstatsRequest(family uint16, attr uint16, cpus string, seq uint32) []byte {
	val := append([]byte(cpus), 0)
	attrLen := unix.SizeofNlAttr + len(val)
	n := unix.NLMSG_HDRLEN + genlHeaderLen + nlaAlign(attrLen)
	b := make([]byte, n)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], family)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(b[8:], seq)
	b[16] = taskstatsCmdGet
	b[17] = 1 // TASKSTATS_GENL_VERSION
	a := b[unix.NLMSG_HDRLEN+genlHeaderLen:]
	binary.NativeEndian.PutUint16(a[0:], uint16(attrLen))
	binary.NativeEndian.PutUint16(a[2:], attr)
	copy(a[unix.SizeofNlAttr:], val)
	return b
}

// taskstats listens for the exit record of every task on the machine.
type taskstats struct {
	fd     int
	family uint16
	cpus   string

	mu      sync.Mutex
	changed chan struct{} // closed and replaced whenever records arrive
	records []taskRecord
	err     error // a lost or unparsable datagram: figures are incomplete
}

// openTaskstats registers for exit records on every CPU.
func openTaskstats() (*taskstats, error) {
	fam, err := netlink.GenlFamilyGet("TASKSTATS")
	if err != nil {
		return nil, fmt.Errorf("generic netlink family TASKSTATS: %w", err)
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	// Bursts of exits (a Go program's threads) must not overflow the queue.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding netlink socket: %w", err)
	}
	ts := &taskstats{fd: fd, family: fam.ID, cpus: fmt.Sprintf("0-%d", runtime.NumCPU()-1), changed: make(chan struct{})}
	if err := unix.Sendto(fd, taskstatsRequest(ts.family, taskstatsAttrRegisterCPUs, ts.cpus, 1), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("registering for taskstats: %w", err)
	}
	go ts.read()
	return ts, nil
}

func (ts *taskstats) read() {
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(ts.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			return // closed
		}
		var recs []taskRecord
		if err == nil {
			recs, err = parseTaskstats(buf[:n])
		}
		ts.mu.Lock()
		if err != nil && ts.err == nil {
			ts.err = fmt.Errorf("taskstats records lost: %w", err)
		}
		ts.records = append(ts.records, recs...)
		close(ts.changed)
		ts.changed = make(chan struct{})
		ts.mu.Unlock()
	}
}

// mark returns a position in the stream of records.
func (ts *taskstats) mark() int {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return len(ts.records)
}

// since returns the records received after mark m, and an error if any
// record may have been lost.
func (ts *taskstats) since(m int) ([]taskRecord, error) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]taskRecord(nil), ts.records[m:]...), ts.err
}

// barrier returns once every record the kernel queued before the call has
// been read: it runs a short program and waits for its own exit record,
// which the kernel queues after all earlier ones.
func (ts *taskstats) barrier(ctx context.Context) error {
	// Only records after this point: process ids are reused.
	from := ts.mark()
	cmd := exec.CommandContext(ctx, truePath)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("taskstats barrier: %w", err)
	}
	pid := uint32(cmd.Process.Pid)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		ts.mu.Lock()
		for _, r := range ts.records[from:] {
			if r.PID == pid {
				ts.mu.Unlock()
				return nil
			}
		}
		from = len(ts.records)
		ch := ts.changed
		ts.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("taskstats: no exit record of %s (pid %d): %w", truePath, pid, ctx.Err())
		}
	}
}

// close deregisters the listener and closes the socket.
func (ts *taskstats) close() {
	_ = unix.Sendto(ts.fd, taskstatsRequest(ts.family, taskstatsAttrDeregisterCPUs, ts.cpus, 2), 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
	unix.Close(ts.fd)
}

// truePath is the program the barrier runs.
var truePath = "/bin/true"

// usage is what a process and its children cost, from their exit records.
type usage struct {
	// CPU is the CPU time of the process and all its children.
	CPU time.Duration
	// SelfPeakKB is the process's own peak RSS; ChildPeakKB the largest
	// peak RSS of any child that ran a program.
	SelfPeakKB, ChildPeakKB uint64
	// Children is the number of programs the process started.
	Children int
	// Clones counts children that ended without running a program: the Go
	// runtime's one-time check that clone(CLONE_PIDFD) works starts a copy
	// of the process that shares its memory and exits at once. They add
	// no memory and no program run, so they are counted apart.
	Clones int
}

// usageOf sums the records of process pid (all its threads) and of the
// processes it started (records whose parent is pid). exeInode is the
// inode of pid's program: a child still running it never exec'd.
func usageOf(recs []taskRecord, pid uint32, exeInode uint64) usage {
	var u usage
	children, clones := map[uint32]bool{}, map[uint32]bool{}
	for _, r := range recs {
		switch {
		case r.process() == pid:
			u.CPU += r.cpu()
			u.SelfPeakKB = max(u.SelfPeakKB, r.HiwaterRSSKB)
		case r.PPID == pid && exeInode != 0 && r.ExeInode == exeInode:
			u.CPU += r.cpu()
			clones[r.process()] = true
		case r.PPID == pid:
			u.CPU += r.cpu()
			u.ChildPeakKB = max(u.ChildPeakKB, r.HiwaterRSSKB)
			children[r.process()] = true
		}
	}
	u.Children, u.Clones = len(children), len(clones)
	return u
}

// childrenOf sums only the records of processes pid started.
func childrenOf(recs []taskRecord, pid uint32, exeInode uint64) usage {
	var kids []taskRecord
	for _, r := range recs {
		if r.PPID == pid && r.process() != pid {
			kids = append(kids, r)
		}
	}
	return usageOf(kids, pid, exeInode)
}

// inodeOf returns the inode of the file at path, or 0.
func inodeOf(path string) uint64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
