package graph

import (
	"bufio"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// BenchmarkLoadSave1GB loads and saves a model with about 1 GB of external
// data (64 tensors of 16 MiB) and compares the time with a plain copy of the
// same files. It writes 2 GB to the temp folder, so it runs only when
// ONNXLORA_BENCH_BIG=1:
//
//	ONNXLORA_BENCH_BIG=1 go test ./graph/ -run '^$' -bench LoadSave1GB -benchtime 3x
func BenchmarkLoadSave1GB(b *testing.B) {
	if os.Getenv("ONNXLORA_BENCH_BIG") != "1" {
		b.Skip("skipping: set ONNXLORA_BENCH_BIG=1 to run the 1 GB load/save benchmark")
	}
	benchLoadSave(b, 64, 16<<20)
}

// BenchmarkLoadSave100MB is the same with about 100 MB (25 tensors of 4 MiB).
func BenchmarkLoadSave100MB(b *testing.B) {
	benchLoadSave(b, 25, 4<<20)
}

// writeBigModel writes dir/model.onnx whose n FLOAT16 initializers of size
// bytes each live in dir/model.onnx.data, and returns the model's path and
// the total size of both files.
func writeBigModel(tb testing.TB, dir string, n int, size int64) (string, int64) {
	tb.Helper()
	dataName := "model.onnx.data"
	df, err := os.Create(filepath.Join(dir, dataName))
	if err != nil {
		tb.Fatal(err)
	}
	w := bufio.NewWriterSize(df, 1<<20)
	chunk := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(chunk)
	g := &onnxpb.GraphProto{Name: proto.String("big"), Input: []*onnxpb.ValueInfoProto{valueInfo("x")}}
	prev := "x"
	var offset int64
	for i := 0; i < n; i++ {
		// Make every tensor different without regenerating 16 MiB of noise.
		copy(chunk, fmt.Sprintf("tensor %08d", i))
		if _, err := w.Write(chunk); err != nil {
			tb.Fatal(err)
		}
		name := fmt.Sprintf("layers.%d.weight", i)
		t := &onnxpb.TensorProto{
			Name:         proto.String(name),
			DataType:     proto.Int32(int32(Float16)),
			Dims:         []int64{size / 2 / 1024, 1024},
			DataLocation: onnxpb.TensorProto_EXTERNAL.Enum(),
		}
		SetExternal(t, dataName, offset, size)
		offset += size
		g.Initializer = append(g.Initializer, t)
		out := fmt.Sprintf("h%d", i)
		g.Node = append(g.Node, node(fmt.Sprintf("MatMul_%d", i), "MatMul", []string{prev, name}, []string{out}))
		prev = out
	}
	g.Output = []*onnxpb.ValueInfoProto{valueInfo(prev)}
	if err := w.Flush(); err != nil {
		tb.Fatal(err)
	}
	if err := df.Close(); err != nil {
		tb.Fatal(err)
	}
	path := writeModel(tb, dir, "model.onnx", newModelProto(g))
	st, err := os.Stat(path)
	if err != nil {
		tb.Fatal(err)
	}
	return path, offset + st.Size()
}

// copyFile copies src to dst and syncs it, as Save syncs what it writes.
func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// peakRSS returns the process's peak resident set size (VmHWM) in bytes, and
// resetPeakRSS starts a new peak; both are no-ops off Linux.
func peakRSS() int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// heapSampler records the largest HeapInuse seen while it runs.
type heapSampler struct {
	peak atomic.Uint64
	stop chan struct{}
	wg   sync.WaitGroup
}

func startHeapSampler() *heapSampler {
	s := &heapSampler{stop: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		var ms runtime.MemStats
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > s.peak.Load() {
				s.peak.Store(ms.HeapInuse)
			}
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *heapSampler) Stop() uint64 {
	close(s.stop)
	s.wg.Wait()
	return s.peak.Load()
}

func benchLoadSave(b *testing.B, n int, size int64) {
	src := b.TempDir()
	path, total := writeBigModel(b, src, n, size)
	out := b.TempDir()
	var copyTime, saveTime time.Duration
	var peakHeap uint64
	var peakRSSGrowth int64
	b.SetBytes(total)
	b.ResetTimer()
	plainCopy := func() {
		start := time.Now()
		if err := copyFile(filepath.Join(out, "copy.onnx"), path); err != nil {
			b.Fatal(err)
		}
		if err := copyFile(filepath.Join(out, "copy.onnx.data"), path+".data"); err != nil {
			b.Fatal(err)
		}
		copyTime += time.Since(start)
	}
	loadSave := func() {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		baseHeap := ms.HeapInuse
		resetPeakRSS()
		baseRSS := peakRSS()
		sampler := startHeapSampler()
		start := time.Now()
		m, err := Load(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := m.Save(filepath.Join(out, "saved.onnx"), SaveOptions{}); err != nil {
			b.Fatal(err)
		}
		m.Close()
		saveTime += time.Since(start)
		if h := sampler.Stop(); h > baseHeap && h-baseHeap > peakHeap {
			peakHeap = h - baseHeap
		}
		if r := peakRSS() - baseRSS; r > peakRSSGrowth {
			peakRSSGrowth = r
		}
	}
	// Each measurement starts with no dirty pages left by the one before.
	settle := func() {
		b.StopTimer()
		exec.Command("sync").Run()
		b.StartTimer()
	}
	for i := 0; i < b.N; i++ {
		// Alternate which goes first, in case one still pays for the other.
		settle()
		if i%2 == 0 {
			plainCopy()
			settle()
			loadSave()
		} else {
			loadSave()
			settle()
			plainCopy()
		}
		b.StopTimer()
		for _, name := range []string{"copy.onnx", "copy.onnx.data", "saved.onnx", "saved.onnx.data"} {
			os.Remove(filepath.Join(out, name))
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(saveTime)/float64(copyTime), "x-copy")
	b.ReportMetric(float64(saveTime.Milliseconds())/float64(b.N), "ms-loadsave/op")
	b.ReportMetric(float64(copyTime.Milliseconds())/float64(b.N), "ms-copy/op")
	b.ReportMetric(float64(peakHeap)/float64(total), "peak-heap/size")
	b.ReportMetric(float64(peakRSSGrowth)/float64(total), "peak-rss/size")
}
