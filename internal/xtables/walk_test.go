package xtables

import (
	"encoding/binary"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// recordedNames lists testdata/, recorded by TestRecord -record from
// tables built with iptables-legacy-restore 1.8.9.
func recordedNames(t testing.TB) []string {
	t.Helper()
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("testdata/ was recorded on a little-endian machine; the kernel's entries are in native byte order")
	}
	files, err := filepath.Glob(filepath.Join("testdata", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no recorded tables in testdata/ (%v)", err)
	}
	var names []string
	for _, f := range files {
		names = append(names, strings.TrimSuffix(filepath.Base(f), ".json"))
	}
	return names
}

// TestWalkRecorded: on tables recorded from a kernel, the walk tells what
// iptables-legacy-save printed of them, or says it cannot.
func TestWalkRecorded(t *testing.T) {
	for _, name := range recordedNames(t) {
		t.Run(name, func(t *testing.T) {
			rec := loadRecorded(t, name)
			got, err := Walk(rec.Family, rec.Info, rec.Entries, ours)
			if err != nil {
				t.Fatal(err)
			}
			// The drifted tables hold, in raw, "-j CT --notrack" in our
			// chain and, in filter, a jump to ours with a comment match:
			// forms the walk leaves to iptables-legacy-save.
			if strings.Contains(name, "drifted") && rec.Table != "nat" {
				if got.Unrecognised == "" {
					t.Fatalf("recognised %+v, want it left to iptables-legacy-save", got)
				}
				if len(got.Chains) != 0 || len(got.Jumps) != 0 {
					t.Errorf("an unrecognised table still tells chains or jumps: %+v", got)
				}
				t.Logf("not recognised: %s", got.Unrecognised)
				return
			}
			if got.Unrecognised != "" {
				t.Fatalf("not recognised: %s", got.Unrecognised)
			}
			if d := diffTables(fromSave(rec.Save), got); d != "" {
				t.Errorf("walk and iptables-legacy-save differ (-save +walk):\n%s", d)
			}
			if strings.Contains(name, "ours") || strings.Contains(name, "foreign") {
				if rec.Table != "nat" && len(got.Chains) == 0 {
					t.Errorf("no chain of ours found in %s", rec.Table)
				}
			}
		})
	}
}

// TestWalkTruncated: a table cut short anywhere is an error, never a table
// without our rules, whether or not the info agrees with the cut.
func TestWalkTruncated(t *testing.T) {
	for _, name := range recordedNames(t) {
		rec := loadRecorded(t, name)
		for n := range len(rec.Entries) {
			cut := rec.Entries[:n]
			if _, err := Walk(rec.Family, rec.Info, cut, ours); err == nil {
				t.Errorf("%s cut to %d bytes: no error", name, n)
			}
			in := rec.Info
			in.Size = uint32(n)
			if _, err := Walk(rec.Family, in, cut, ours); err == nil {
				t.Errorf("%s cut to %d bytes, info cut too: no error", name, n)
			}
		}
	}
}

// TestWalkMalformed: entries at odds with themselves or with the info are
// errors.
func TestWalkMalformed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(l layout, in *TableInfo, b []byte)
	}{
		{"next offset zero", func(l layout, _ *TableInfo, b []byte) { put16(b, l.nextOffset, 0) }},
		{"next offset beyond the table", func(l layout, _ *TableInfo, b []byte) { put16(b, l.nextOffset, 0xfff8) }},
		{"next offset misaligned", func(l layout, _ *TableInfo, b []byte) { put16(b, l.nextOffset, uint16(get16(b, l.nextOffset)+1)) }},
		{"target offset inside the header", func(l layout, _ *TableInfo, b []byte) { put16(b, l.targetOffset, 8) }},
		{"target offset past the entry", func(l layout, _ *TableInfo, b []byte) { put16(b, l.targetOffset, uint16(get16(b, l.nextOffset))) }},
		{"target size wrong", func(l layout, _ *TableInfo, b []byte) {
			put16(b, int(get16(b, l.targetOffset)), 8)
		}},
		{"jump beyond the table", func(l layout, _ *TableInfo, b []byte) {
			binary.NativeEndian.PutUint32(b[int(get16(b, l.targetOffset))+extHeader:], uint32(len(b)+8))
		}},
		{"hook entry inside an entry", func(_ layout, in *TableInfo, _ []byte) { in.HookEntry[1] += 8 }},
		{"policy not at the chain's end", func(_ layout, in *TableInfo, _ []byte) { in.Underflow[1] = in.HookEntry[1] + 8 }},
		{"entry count wrong", func(_ layout, in *TableInfo, _ []byte) { in.NumEntries++ }},
		{"size wrong", func(_ layout, in *TableInfo, _ []byte) { in.Size += 8 }},
		{"no end marker", func(l layout, _ *TableInfo, b []byte) {
			end := len(b) - l.entrySize - errorTargetSize
			copy(b[end+l.entrySize+extHeader:], "XXXXX")
		}},
		{"end marker in the middle", func(l layout, _ *TableInfo, b []byte) {
			end := len(b) - l.entrySize - errorTargetSize
			copy(b[end+l.entrySize+2:], "YYYYY")
		}},
	} {
		for _, name := range []string{"ipv4-ours-filter", "ipv6-ours-filter"} {
			t.Run(tc.name+"/"+name, func(t *testing.T) {
				rec := loadRecorded(t, name)
				l := layouts[rec.Family]
				b := slices.Clone(rec.Entries)
				in := rec.Info
				tc.corrupt(l, &in, b)
				got, err := Walk(rec.Family, in, b, ours)
				if err == nil {
					t.Fatalf("no error; walk says %+v", got)
				}
				t.Log(err)
			})
		}
	}
}

// TestWalkEveryByte flips each byte of a recorded table in turn: the walk
// may fail or tell something else, but never panics, and a table it
// cannot render is never passed off as one.
func TestWalkEveryByte(t *testing.T) {
	for _, name := range []string{"ipv4-foreign-filter", "ipv6-foreign-raw"} {
		rec := loadRecorded(t, name)
		for i := range rec.Entries {
			b := slices.Clone(rec.Entries)
			b[i] ^= 0xff
			got, err := Walk(rec.Family, rec.Info, b, ours)
			checkWalk(t, got, err)
		}
	}
}

func checkWalk(t *testing.T, got Table, err error) {
	t.Helper()
	if err != nil {
		return
	}
	if got.Unrecognised != "" && (len(got.Chains) != 0 || len(got.Jumps) != 0) {
		t.Fatalf("unrecognised, but tells chains or jumps: %+v", got)
	}
	for c := range got.Chains {
		if !ours(c) {
			t.Fatalf("chain %s is not one looked for", c)
		}
	}
}

// FuzzWalk: on any entries and any info, the walk returns an error or a
// consistent answer, and never panics.
func FuzzWalk(f *testing.F) {
	for _, name := range []string{"ipv4-empty-raw", "ipv4-ours-filter", "ipv6-empty-filter"} { // small: large seeds slow the fuzzer to a crawl
		rec := loadRecorded(f, name)
		f.Add(rec.Family == IPv6, infoBytes(rec.Info), rec.Entries)
	}
	f.Fuzz(func(t *testing.T, v6 bool, info, entries []byte) {
		fam := IPv4
		if v6 {
			fam = IPv6
		}
		var b [infoSize]byte
		copy(b[:], info)
		got, err := Walk(fam, parseInfo(b[:]), entries, ours)
		checkWalk(t, got, err)
	})
}

func infoBytes(in TableInfo) []byte {
	b := make([]byte, infoSize)
	put := func(off int, v uint32) { binary.NativeEndian.PutUint32(b[off:], v) }
	put(tableNameLen, in.ValidHooks)
	for h := range numHooks {
		put(tableNameLen+4+4*h, in.HookEntry[h])
		put(tableNameLen+4+4*numHooks+4*h, in.Underflow[h])
	}
	put(tableNameLen+4+8*numHooks, in.NumEntries)
	put(tableNameLen+4+8*numHooks+4, in.Size)
	return b
}

func get16(b []byte, off int) int       { return int(binary.NativeEndian.Uint16(b[off:])) }
func put16(b []byte, off int, v uint16) { binary.NativeEndian.PutUint16(b[off:], v) }
