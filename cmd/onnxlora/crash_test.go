package main

import (
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
	"github.com/onnxlora/onnxlora/rewrite"
)

// Crash consistency and concurrency, through the real binary: merge and
// inject write a model with external data while being killed with SIGKILL
// at random moments (half the runs with every fsync slowed down, so kills
// land between syncs and renames). After each kill the destination must
// hold nothing, the previous complete output or the new complete output
// (every tensor's bytes equal to a clean run's, and ONNX Runtime loads
// it); the next complete run must leave no temporaries; the inputs must
// never change. ONNXLORA_CRASH_MB (default 20) sets the model's size,
// ONNXLORA_CRASH_KILLS (default 24 per command) the number of kills.

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// buildBinary builds onnxlora once for these tests.
var buildBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "onnxlora-bin")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "onnxlora")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

func onnxloraBinary(t *testing.T) string {
	t.Helper()
	bin, err := buildBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// crashModel writes a base model of about mb MB in external data: a chain
// of [d,d] float MatMul layers named layers.<i>.fc.
func crashModel(t *testing.T, path string, mb int) {
	t.Helper()
	const d = 512 // 1 MiB per layer
	g := &onnxpb.GraphProto{Name: proto.String("crash")}
	prev := "x"
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range mb {
		w := fmt.Sprintf("layers.%d.fc.weight", i)
		vals := make([]float64, d*d)
		for j := range vals {
			vals[j] = rng.NormFloat64() * 0.05
		}
		ti, err := graph.NewFloatTensor(w, graph.Float, []int64{d, d}, vals)
		if err != nil {
			t.Fatal(err)
		}
		g.Initializer = append(g.Initializer, ti)
		out := fmt.Sprintf("h%d", i)
		g.Node = append(g.Node, &onnxpb.NodeProto{Name: proto.String(fmt.Sprintf("/layers.%d/fc/MatMul", i)), OpType: proto.String("MatMul"), Input: []string{prev, w}, Output: []string{out}})
		prev = out
	}
	g.Node[len(g.Node)-1].Output[0] = "y"
	shape := func(dims ...int64) *onnxpb.TypeProto {
		s := &onnxpb.TensorShapeProto{}
		for _, v := range dims {
			s.Dim = append(s.Dim, &onnxpb.TensorShapeProto_Dimension{Value: &onnxpb.TensorShapeProto_Dimension_DimValue{DimValue: v}})
		}
		return &onnxpb.TypeProto{Value: &onnxpb.TypeProto_TensorType{TensorType: &onnxpb.TypeProto_Tensor{ElemType: proto.Int32(int32(graph.Float)), Shape: s}}}
	}
	g.Input = []*onnxpb.ValueInfoProto{{Name: proto.String("x"), Type: shape(1, d)}}
	g.Output = []*onnxpb.ValueInfoProto{{Name: proto.String("y"), Type: shape(1, d)}}
	mp := &onnxpb.ModelProto{IrVersion: proto.Int64(8), ProducerName: proto.String("crash-test"),
		OpsetImport: []*onnxpb.OperatorSetIdProto{{Domain: proto.String(""), Version: proto.Int64(17)}}, Graph: g}
	if err := graph.NewModel(mp, "").Save(path, graph.SaveOptions{External: graph.ExternalAlways}); err != nil {
		t.Fatal(err)
	}
}

// trainAdapters gives every lora_B of an injected model random values, so
// that a merge changes the weights, and saves it with external data.
func trainAdapters(t *testing.T, src, dst string) {
	t.Helper()
	onlyB := func(a rewrite.Adapter) []string { return []string{a.LoraB} }
	randomizeAdapters(t, src, dst, rand.New(rand.NewPCG(5, 6)), onlyB, graph.SaveOptions{External: graph.ExternalAlways})
}

// tensorSums loads a model and hashes every tensor's bytes by name: two
// outputs are the same when these agree, whatever their data files are
// called. It fails the test if the model does not load.
func tensorSums(t *testing.T, path string) map[string][32]byte {
	t.Helper()
	m, err := graph.Load(path)
	if err != nil {
		t.Fatalf("%s does not load: %v", path, err)
	}
	defer m.Close()
	sums := map[string][32]byte{}
	m.Tensors(func(ti *onnxpb.TensorProto) {
		raw, err := m.RawData(ti)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		sums[ti.GetName()] = sha256.Sum256(raw)
	})
	return sums
}

func sameSums(a, b map[string][32]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// cleanDir checks that dir holds exactly out.onnx and the data files it
// uses: no temporaries, no lock, no orphaned data.
func cleanDir(t *testing.T, dir, what string) {
	t.Helper()
	m, err := graph.Load(filepath.Join(dir, "out.onnx"))
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	want := []string{"out.onnx"}
	for _, f := range m.InputFiles()[1:] {
		want = append(want, filepath.Base(f))
	}
	m.Close()
	sort.Strings(want)
	if got := listNames(t, dir); !slices.Equal(got, want) {
		t.Fatalf("%s: folder holds %v, want %v", what, got, want)
	}
}

type crashCase struct {
	name     string
	args     func(out string, variant int) []string // variant 0 or 1: two different outputs
	inputDir string
}

func runCrashCase(t *testing.T, bin string, c crashCase, kills int) (killed, nothing, old, new int) {
	work := t.TempDir()
	ref := t.TempDir()
	var sums [2]map[string][32]byte
	// How long a run takes, plain and with slow syncs (the fastest of a
	// few): kills are spread over that time.
	var took [2]time.Duration
	for k := range 6 {
		v, slow := k%2, k/2%2
		p := filepath.Join(ref, fmt.Sprintf("v%d", v), "out.onnx")
		os.MkdirAll(filepath.Dir(p), 0o755)
		cmd := exec.Command(bin, c.args(p, v)...)
		if slow == 1 {
			cmd.Env = append(os.Environ(), "ONNXLORA_DEBUG_SYNC_DELAY=30ms")
		}
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("clean run: %v\n%s", err, out)
		}
		if d := time.Since(start); took[slow] == 0 || d < took[slow] {
			took[slow] = d
		}
		sums[v] = tensorSums(t, p)
	}
	if sameSums(sums[0], sums[1]) {
		t.Fatal("the two variants write the same model; the test could not tell them apart")
	}
	inputs := snapshot(t, c.inputDir)
	ortOK := ortrun.Init() == nil
	out := filepath.Join(work, "out.onnx")
	rng := rand.New(rand.NewPCG(7, uint64(len(c.name))))
	state := -1 // what out.onnx holds: -1 nothing, else a variant
	for i := range kills {
		if i%4 == 0 {
			for _, n := range listNames(t, work) {
				os.Remove(filepath.Join(work, n))
			}
			state = -1
		}
		v := i % 2
		if state >= 0 {
			v = 1 - state // so that the old and the new output differ
		}
		cmd := exec.Command(bin, c.args(out, v)...)
		cmd.Env = os.Environ()
		if i%2 == 1 {
			cmd.Env = append(cmd.Env, "ONNXLORA_DEBUG_SYNC_DELAY=30ms")
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		delay := time.Duration(rng.Int64N(int64(took[i%2])))
		time.Sleep(delay)
		cmd.Process.Signal(syscall.SIGKILL)
		if err := cmd.Wait(); err != nil && strings.Contains(err.Error(), "killed") {
			killed++ // killed while running, not after it finished
		}

		switch _, err := os.Stat(out); {
		case os.IsNotExist(err):
			if state != -1 {
				t.Fatalf("kill %d after %v: the previous output is gone", i, delay)
			}
			nothing++
		default:
			got := tensorSums(t, out)
			switch {
			case sameSums(got, sums[v]):
				new++
				state = v
			case state >= 0 && sameSums(got, sums[state]):
				old++
			default:
				t.Fatalf("kill %d after %v: out.onnx is neither the previous nor the new output", i, delay)
			}
			if ortOK {
				s, err := ortrun.Open(out, nil)
				if err != nil {
					t.Fatalf("kill %d: ONNX Runtime cannot load the output: %v", i, err)
				}
				s.Close()
			}
		}
		// The next complete run cleans up after the killed one.
		next := 1 - v
		if o, err := exec.Command(bin, c.args(out, next)...).CombinedOutput(); err != nil {
			t.Fatalf("run after kill %d: %v\n%s", i, err, o)
		}
		state = next
		if !sameSums(tensorSums(t, out), sums[next]) {
			t.Fatalf("run after kill %d wrote the wrong model", i)
		}
		cleanDir(t, work, fmt.Sprintf("after kill %d and a complete run", i))
		for p, sum := range inputs {
			if b, err := os.ReadFile(p); err != nil || sha256.Sum256(b) != sum {
				t.Fatalf("kill %d: input %s changed", i, p)
			}
		}
		if len(listNames(t, c.inputDir)) != len(inputs) {
			t.Fatalf("kill %d: files appeared among the inputs: %v", i, listNames(t, c.inputDir))
		}
	}
	return
}

func TestCrashConsistency(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and kills the binary")
	}
	if ortrun.Init() != nil && os.Getenv(orttest.EnvRequire) != "" {
		orttest.Require(t)
	}
	bin := onnxloraBinary(t)
	mb := envInt("ONNXLORA_CRASH_MB", 20)
	kills := envInt("ONNXLORA_CRASH_KILLS", 24)
	in := t.TempDir()
	base := filepath.Join(in, "base.onnx")
	crashModel(t, base, mb)
	lora := filepath.Join(t.TempDir(), "lora.onnx")
	if o, err := exec.Command(bin, "inject", base, "-o", lora, "--target", "fc", "--rank", "4", "-q").CombinedOutput(); err != nil {
		t.Fatalf("inject: %v\n%s", err, o)
	}
	trainDir := t.TempDir()
	trained := filepath.Join(trainDir, "trained.onnx")
	trainAdapters(t, lora, trained)
	for _, c := range []crashCase{
		{"merge", func(out string, v int) []string {
			return []string{"merge", trained, "-o", out, "--scale", []string{"1", "0.5"}[v], "-q"}
		}, trainDir},
		{"inject", func(out string, v int) []string {
			return []string{"inject", base, "-o", out, "--target", "fc", "--rank", []string{"4", "2"}[v], "-q"}
		}, in},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			killed, nothing, old, new := runCrashCase(t, bin, c, kills)
			t.Logf("%s, %d MB: %d runs, %d killed while running, in %v: afterwards nothing %d, previous output %d, new output %d; every complete run after left a clean folder",
				c.name, mb, kills, killed, time.Since(start).Round(time.Millisecond), nothing, old, new)
		})
	}
}

// TestConcurrentMerges runs 8 merges with different scales into one path
// at once, several rounds: all succeed, and the output is one of the 8
// complete models with nothing else left in the folder.
func TestConcurrentMerges(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := onnxloraBinary(t)
	in := t.TempDir()
	base := filepath.Join(in, "base.onnx")
	crashModel(t, base, envInt("ONNXLORA_CONCURRENT_MB", 8))
	lora := filepath.Join(t.TempDir(), "lora.onnx")
	if o, err := exec.Command(bin, "inject", base, "-o", lora, "--target", "fc", "--rank", "4", "-q").CombinedOutput(); err != nil {
		t.Fatalf("inject: %v\n%s", err, o)
	}
	trained := filepath.Join(t.TempDir(), "trained.onnx")
	trainAdapters(t, lora, trained)
	scales := []string{"0.25", "0.5", "0.75", "1", "1.25", "1.5", "1.75", "2"}
	ref := t.TempDir()
	sums := make([]map[string][32]byte, len(scales))
	for i, s := range scales {
		p := filepath.Join(ref, fmt.Sprintf("s%d.onnx", i))
		if o, err := exec.Command(bin, "merge", trained, "-o", p, "--scale", s, "-q").CombinedOutput(); err != nil {
			t.Fatalf("%v\n%s", err, o)
		}
		sums[i] = tensorSums(t, p)
	}
	rounds := envInt("ONNXLORA_CONCURRENT_ROUNDS", 3)
	start := time.Now()
	seen := map[int]int{}
	for r := range rounds {
		work := t.TempDir()
		out := filepath.Join(work, "out.onnx")
		var wg sync.WaitGroup
		errs := make([]error, len(scales))
		outs := make([][]byte, len(scales))
		for i, s := range scales {
			wg.Add(1)
			go func() {
				defer wg.Done()
				outs[i], errs[i] = exec.Command(bin, "merge", trained, "-o", out, "--scale", s, "-q").CombinedOutput()
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d, merge %d: %v\n%s", r, i, err, outs[i])
			}
		}
		got := tensorSums(t, out)
		which := -1
		for i := range sums {
			if sameSums(got, sums[i]) {
				which = i
			}
		}
		if which < 0 {
			t.Fatalf("round %d: the output is none of the 8 merges: a mix", r)
		}
		seen[which]++
		cleanDir(t, work, fmt.Sprintf("round %d", r))
		if ortrun.Init() == nil {
			s, err := ortrun.Open(out, nil)
			if err != nil {
				t.Fatalf("round %d: ONNX Runtime: %v", r, err)
			}
			s.Close()
		}
	}
	t.Logf("%d rounds of %d concurrent merges in %v: each ended with one complete output (winners by scale index: %v)", rounds, len(scales), time.Since(start).Round(time.Millisecond), seen)
}
