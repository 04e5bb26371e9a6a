package inspect

import (
	"bytes"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/rewrite"
)

const modelsDir = "../testdata/models"

func load(t *testing.T, name string) *graph.Model {
	t.Helper()
	m, err := graph.Load(filepath.Join(modelsDir, name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// injected returns tiny-gpt with q_proj/v_proj adapters, in memory.
func injected(t *testing.T) *graph.Model {
	t.Helper()
	m := load(t, "tiny-gpt.onnx")
	_, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{
		Targets: []string{"q_proj", "v_proj"}, Rank: 4, Alpha: 8,
	}})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestGoldenReports(t *testing.T) {
	cases := []struct {
		name  string
		model func(t *testing.T) *graph.Model
		opts  Options
	}{
		{"tiny-gpt", func(t *testing.T) *graph.Model { return load(t, "tiny-gpt.onnx") }, Options{}},
		{"shared-weight-all-linear", func(t *testing.T) *graph.Model { return load(t, "shared-weight.onnx") },
			Options{Select: &rewrite.SelectOptions{Targets: []string{"all-linear"}, Rank: 2, Alpha: 4}}},
		{"tiny-gpt-injected", injected, Options{Select: &rewrite.SelectOptions{Targets: []string{"k_proj"}, Layers: []int{0}, Rank: 2, Alpha: 2}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, err := Build(c.model(t), c.opts)
			if err != nil {
				t.Fatal(err)
			}
			var text, js, dot bytes.Buffer
			if err := WriteText(&text, r); err != nil {
				t.Fatal(err)
			}
			if err := WriteJSON(&js, r); err != nil {
				t.Fatal(err)
			}
			if err := WriteDOT(&dot, r, DOTOptions{}); err != nil {
				t.Fatal(err)
			}
			testutil.Golden(t, c.name+".txt", text.Bytes())
			testutil.Golden(t, c.name+".json", js.Bytes())
			testutil.Golden(t, c.name+".dot", dot.Bytes())
			for _, out := range []*bytes.Buffer{&text, &dot} {
				for i, line := range strings.Split(out.String(), "\n") {
					if strings.TrimRight(line, " ") != line {
						t.Errorf("line %d has trailing spaces: %q", i+1, line)
					}
				}
			}
		})
	}
}

// TestDeltaNorm trains nothing but fills B with random values, and checks
// the Gram-matrix norm against scaling·A·B formed explicitly.
func TestDeltaNorm(t *testing.T) {
	m := injected(t)
	man, err := rewrite.ReadManifest(m)
	if err != nil || man == nil {
		t.Fatal(err)
	}
	g := m.Graph()
	rng := rand.New(rand.NewPCG(1, 2))
	want := map[string]float64{}
	for _, a := range man.Adapters {
		tA := findInitializer(g, a.Graph, a.LoraA)
		tB := findInitializer(g, a.Graph, a.LoraB)
		av, _ := m.Float64s(tA)
		bv := make([]float64, tB.Dims[0]*tB.Dims[1])
		for i := range bv {
			bv[i] = rng.NormFloat64()
		}
		if err := graph.SetFloat64s(tB, bv); err != nil {
			t.Fatal(err)
		}
		bv, _ = m.Float64s(tB) // as stored (float32)
		in, r, out := int(tA.Dims[0]), int(tA.Dims[1]), int(tB.Dims[1])
		sum := 0.0
		for i := 0; i < in; i++ {
			for j := 0; j < out; j++ {
				d := 0.0
				for k := 0; k < r; k++ {
					d += av[i*r+k] * bv[k*out+j]
				}
				sum += d * d
			}
		}
		want[a.Module] = a.Scaling * math.Sqrt(sum)
	}
	rep, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Adapters) != 4 {
		t.Fatalf("%d adapters, want 4", len(rep.Adapters))
	}
	for _, a := range rep.Adapters {
		if a.Norm == nil {
			t.Fatalf("%s: no norm: %s", a.Module, a.Error)
		}
		if w := want[a.Module]; w == 0 || math.Abs(*a.Norm-w) > 1e-5*w {
			t.Errorf("%s: norm %v, want %v", a.Module, *a.Norm, w)
		}
	}

	rep, err = Build(m, Options{SkipNorms: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Adapters[0].Norm != nil {
		t.Error("SkipNorms still computed a norm")
	}
}

func TestNormOfMissingTensor(t *testing.T) {
	m := injected(t)
	man, _ := rewrite.ReadManifest(m)
	man.Adapters[0].LoraB = "no-such-tensor"
	if err := rewrite.WriteManifest(m, man); err != nil {
		t.Fatal(err)
	}
	rep, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if a := rep.Adapters[0]; a.Norm != nil || !strings.Contains(a.Error, "no-such-tensor") {
		t.Errorf("adapter with a missing B: norm %v, error %q", a.Norm, a.Error)
	}
}

func TestExternalData(t *testing.T) {
	m := load(t, "tiny-gpt-extdata/model.onnx")
	r, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ext := r.Model.External
	if ext.Tensors != 17 || len(ext.Files) != 1 || ext.Files[0].Location != "model.onnx.data" || ext.Bytes != ext.Files[0].FileBytes {
		t.Errorf("external data: %+v", ext)
	}
}

func TestDrawnLayers(t *testing.T) {
	m := load(t, "tiny-gpt.onnx")
	r, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(DrawnLayers(r, DOTOptions{})); n != 15 {
		t.Errorf("no selection: %d layers drawn, want all 15", n)
	}
	if n := len(DrawnLayers(r, DOTOptions{Layer: regexp.MustCompile(`mlp`)})); n != 6 {
		t.Errorf("--layer mlp: %d layers drawn, want 6", n)
	}
	r, err = Build(m, Options{Select: &rewrite.SelectOptions{Targets: []string{"o_proj"}, Rank: 8, Alpha: 8}})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(DrawnLayers(r, DOTOptions{})); n != 2 {
		t.Errorf("selection o_proj: %d layers drawn, want 2", n)
	}
	if err := WriteDOT(&bytes.Buffer{}, r, DOTOptions{Layer: regexp.MustCompile(`lm_head`)}); err == nil {
		t.Error("WriteDOT with nothing to draw succeeded")
	}
}

func TestSelectionErrors(t *testing.T) {
	m := load(t, "tiny-gpt.onnx")
	_, err := Build(m, Options{Select: &rewrite.SelectOptions{Targets: []string{"query"}, Rank: 8, Alpha: 8}})
	if err == nil || !strings.Contains(err.Error(), "no module matched") {
		t.Errorf("no match: %v", err)
	}
}

func TestFormatting(t *testing.T) {
	for in, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", -1234: "-1,234"} {
		if got := commas(in); got != want {
			t.Errorf("commas(%d) = %q, want %q", in, got, want)
		}
	}
	if got := formatBytes(3 << 30); got != "3,221,225,472 bytes, 3.0 GiB" {
		t.Errorf("formatBytes = %q", got)
	}
	if got := round6(1.23456789); got != 1.23457 {
		t.Errorf("round6 = %v", got)
	}
	if got := ellipsis("abcdefghij", 7); got != "ab...ij" {
		t.Errorf("ellipsis = %q", got)
	}
	if got := quote("a\"b\\c\nd"); got != `"a\"b\\c\nd"` {
		t.Errorf("quote = %s", got)
	}
}

// TestDOTRendersWithGraphviz runs Graphviz's dot on the DOT goldens when it
// is installed (Debian: apt-get install graphviz).
func TestDOTRendersWithGraphviz(t *testing.T) {
	dot, err := exec.LookPath("dot")
	if err != nil {
		t.Skip("skipping: Graphviz dot not installed")
	}
	files, _ := filepath.Glob("testdata/*.dot")
	for _, f := range files {
		out, err := exec.Command(dot, "-Tsvg", "-o", os.DevNull, f).CombinedOutput()
		if err != nil || len(out) > 0 {
			t.Errorf("dot %s: %v %s", f, err, out)
		}
	}
}
