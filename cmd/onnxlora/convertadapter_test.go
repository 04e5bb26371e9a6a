package main

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/internal/testutil"
	"github.com/onnxlora/onnxlora/ortrun"
	"github.com/onnxlora/onnxlora/ortrun/orttest"
)

// adaptersTestdata holds testdata/adapters/generate.py's outputs.
const adaptersTestdata = "../../testdata/adapters"

func TestConvertAdapterFromPEFT(t *testing.T) {
	for dir, want := range testutil.PEFTConversions(t) {
		for _, dt := range []string{"", "float16"} {
			out := filepath.Join(t.TempDir(), "a.onnx_adapter")
			args := []string{"convert-adapter", filepath.Join(adaptersTestdata, dir), "-o", out}
			if dt != "" {
				args = append(args, "--dtype", dt)
			}
			r := mustRun(t, args...)
			if !strings.Contains(r.stdout, "Converted 2 module(s)") {
				t.Errorf("stdout: %s", r.stdout)
			}
			a, err := export.ReadOnnxAdapter(out)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range want {
				checkParam(t, a, w.Module+".lora_A.weight", w.ADims, dt, w.AF32, w.AF16Bits)
				checkParam(t, a, w.Module+".lora_B.weight", w.BDims, dt, w.BF32, w.BF16Bits)
			}
		}
	}
}

// checkParam compares a parameter with numpy's values, exactly.
func checkParam(t *testing.T, a *export.OnnxAdapter, name string, dims []int64, dt string, f32 []float64, f16 []uint16) {
	t.Helper()
	p, ok := a.Param(name)
	if !ok {
		t.Fatalf("no parameter %s", name)
	}
	if !reflect.DeepEqual(p.Dims, dims) {
		t.Fatalf("%s: dims %v, want %v", name, p.Dims, dims)
	}
	for i := range f32 {
		if dt == "" {
			if got := float64(math.Float32frombits(binary.LittleEndian.Uint32(p.Data[4*i:]))); got != f32[i] {
				t.Fatalf("%s[%d] = %v, numpy %v", name, i, got, f32[i])
			}
		} else if got := binary.LittleEndian.Uint16(p.Data[2*i:]); got != f16[i] {
			t.Fatalf("%s[%d] = %#04x, numpy %#04x", name, i, got, f16[i])
		}
	}
}

// TestConvertAdapterServesInORT converts both PEFT dirs and runs them on
// one session of the adapter-input model, against a float64
// x·(W + scaling·lora_Aᵀ·lora_Bᵀ) from the PEFT files themselves.
func TestConvertAdapterServesInORT(t *testing.T) {
	modelPath := filepath.Join(adaptersTestdata, "lora-inputs.onnx")
	s := orttest.Open(t, modelPath)
	m, err := graph.Load(modelPath)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const batch, width = 2, 8
	x := make([]float64, batch*width)
	for i := range x {
		x[i] = float64(float32(math.Cos(float64(i)) * 2))
	}
	xt, err := ortrun.FromFloat64("x", ortrun.Float32, []int64{batch, width}, x)
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"peft-plain", "peft-rslora", "peft-plain"} {
		out := filepath.Join(t.TempDir(), dir+".onnx_adapter")
		mustRun(t, "convert-adapter", filepath.Join(adaptersTestdata, dir), "-o", out)
		ad, err := ortrun.LoadAdapter(out)
		if err != nil {
			t.Fatal(err)
		}
		defer ad.Close()
		res, err := s.RunWith([]ortrun.Tensor{xt}, nil, ortrun.RunOptions{Adapters: []*ortrun.Adapter{ad}})
		if err != nil {
			t.Fatal(err)
		}
		got, _ := res[0].Float64s()

		_, mods, err := export.ReadPEFTAdapter(filepath.Join(adaptersTestdata, dir))
		if err != nil {
			t.Fatal(err)
		}
		scaling := map[string]float64{}
		for _, c := range testutil.PEFTConversions(t)[dir] {
			scaling[c.Module] = c.Scaling
		}
		cur, curW := x, width
		for _, pm := range mods {
			init, _ := m.Graph().Initializer(pm.Name + ".weight")
			w, err := m.Float64s(init)
			if err != nil {
				t.Fatal(err)
			}
			in, outF, r := pm.InFeatures, pm.OutFeatures, pm.Rank
			if in != curW {
				t.Fatalf("%s: in %d after width %d", pm.Name, in, curW)
			}
			for i := 0; i < in; i++ {
				for o := 0; o < outF; o++ {
					for k := 0; k < r; k++ {
						w[i*outF+o] += scaling[pm.Name] * float64(pm.A[k*in+i]) * float64(pm.B[o*r+k])
					}
				}
			}
			next := make([]float64, batch*outF)
			for n := 0; n < batch; n++ {
				for o := 0; o < outF; o++ {
					for i := 0; i < in; i++ {
						next[n*outF+o] += cur[n*in+i] * w[i*outF+o]
					}
				}
			}
			cur, curW = next, outF
		}
		var d, mx float64
		for i := range cur {
			d = math.Max(d, math.Abs(got[i]-cur[i]))
			mx = math.Max(mx, math.Abs(cur[i]))
		}
		if d/mx > 1e-5 {
			t.Errorf("%s: rel %g against PEFT's float64 x·(W + s·Aᵀ·Bᵀ)", dir, d/mx)
		}
		t.Logf("%s: ORT with the converted adapter vs PEFT math: rel %.2g", dir, d/mx)
	}
}

// TestConvertAdapterToPEFT converts an adapter that Python wrote to a PEFT
// dir and back: the parameters come back unchanged.
func TestConvertAdapterToPEFT(t *testing.T) {
	src := filepath.Join(adaptersTestdata, "adapter2.onnx_adapter")
	dir := filepath.Join(t.TempDir(), "peft")
	r := mustRun(t, "convert-adapter", src, "-o", dir, "--json")
	var rep convertReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("--json output: %v\n%s", err, r.stdout)
	}
	if rep.Format != "peft" || rep.DType != "float32" || len(rep.Modules) != 2 || rep.Modules[0].Rank != 2 || rep.Modules[1].Rank != 3 {
		t.Errorf("report %+v", rep)
	}
	cfg, mods, err := export.ReadPEFTAdapter(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mods {
		if m.Scaling != 1 || m.Alpha != float64(m.Rank) {
			t.Errorf("%s: alpha %v scaling %v, want alpha = r and scaling 1", m.Name, m.Alpha, m.Scaling)
		}
	}
	if cfg.UseRSLoRA {
		t.Error("use_rslora set")
	}
	back := filepath.Join(t.TempDir(), "back.onnx_adapter")
	mustRun(t, "convert-adapter", dir, "-o", back)
	a, err := export.ReadOnnxAdapter(src)
	if err != nil {
		t.Fatal(err)
	}
	b, err := export.ReadOnnxAdapter(back)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Params) != len(b.Params) {
		t.Fatalf("%d params back, want %d", len(b.Params), len(a.Params))
	}
	for _, p := range a.Params {
		q, ok := b.Param(p.Name)
		if !ok || !reflect.DeepEqual(q.Dims, p.Dims) || string(q.Data) != string(p.Data) {
			t.Errorf("%s changed on the round trip", p.Name)
		}
	}
}

func TestConvertAdapterErrors(t *testing.T) {
	tmp := t.TempDir()
	good, err := os.ReadFile(filepath.Join(adaptersTestdata, "adapter1.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	trunc := filepath.Join(tmp, "trunc.onnx_adapter")
	corrupt := filepath.Join(tmp, "corrupt.onnx_adapter")
	if err := os.WriteFile(trunc, good[:len(good)/3], 0o644); err != nil {
		t.Fatal(err)
	}
	bad := append([]byte{}, good...)
	copy(bad[4:8], "ORTM")
	if err := os.WriteFile(corrupt, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	noConfig := filepath.Join(tmp, "noconfig")
	if err := os.Mkdir(noConfig, 0o755); err != nil {
		t.Fatal(err)
	}
	aFile := filepath.Join(tmp, "exists.onnx_adapter")
	if err := os.WriteFile(aFile, good, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"truncated", []string{trunc, "-o", filepath.Join(tmp, "out1")}, 1, "truncated"},
		{"corrupt", []string{corrupt, "-o", filepath.Join(tmp, "out2")}, 1, "file identifier"},
		{"not lora names", []string{filepath.Join(adaptersTestdata, "mixed.onnx_adapter"), "-o", filepath.Join(tmp, "out3")}, 1, `parameter "half" is not named`},
		{"bad peft dir", []string{noConfig, "-o", filepath.Join(tmp, "out4.onnx_adapter")}, 1, "adapter_config.json"},
		{"missing input", []string{filepath.Join(tmp, "nope"), "-o", filepath.Join(tmp, "out5")}, 1, "no such file"},
		{"peft output into a file", []string{filepath.Join(adaptersTestdata, "adapter1.onnx_adapter"), "-o", aFile}, 1, "is not a directory"},
		{"adapter output onto a dir", []string{filepath.Join(adaptersTestdata, "peft-plain"), "-o", noConfig}, 1, "is a directory"},
		{"output missing folder", []string{filepath.Join(adaptersTestdata, "peft-plain"), "-o", filepath.Join(tmp, "no", "dir", "x.onnx_adapter")}, 1, "does not exist"},
		{"bad dtype", []string{filepath.Join(adaptersTestdata, "peft-plain"), "-o", filepath.Join(tmp, "out6.onnx_adapter"), "--dtype", "int8"}, 2, "--dtype"},
		{"no output", []string{filepath.Join(adaptersTestdata, "peft-plain")}, 2, "missing -o"},
		{"output is input", []string{aFile, "-o", aFile}, 2, "is the input"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before, _ := os.ReadDir(tmp)
			r := run(t, append([]string{"convert-adapter"}, c.args...)...)
			if r.code != c.code || !strings.Contains(r.stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, c.code, c.want)
			}
			if lines := strings.Count(strings.TrimSpace(r.stderr), "\n"); c.code == 1 && (lines != 0 || !strings.HasPrefix(r.stderr, "onnxlora: ")) {
				t.Errorf("stderr is not one error line: %q", r.stderr)
			}
			after, _ := os.ReadDir(tmp)
			if len(after) != len(before) {
				t.Errorf("a failed conversion wrote something: %d entries, had %d", len(after), len(before))
			}
		})
	}
	if got, _ := os.ReadFile(aFile); string(got) != string(good) {
		t.Error("a failed conversion changed an existing file")
	}
}

// TestConvertAdapterForModel: --model maps PEFT module paths onto the
// model's LoRA inputs by dotted suffix, takes its dtype and refuses
// mismatches.
func TestConvertAdapterForModel(t *testing.T) {
	model := filepath.Join(adaptersTestdata, "lora-inputs.onnx")
	tmp := t.TempDir()
	cfg, mods, err := export.ReadPEFTAdapter(filepath.Join(adaptersTestdata, "peft-plain"))
	if err != nil {
		t.Fatal(err)
	}
	// The same adapter with the torch model's longer module paths.
	prefixed := filepath.Join(tmp, "prefixed")
	long := append([]export.PEFTModule{}, mods...)
	pcfg := *cfg
	pcfg.RankPattern = nil
	pcfg.AlphaPattern = nil
	for i := range long {
		long[i].Name = "model.decoder." + long[i].Name
		if long[i].Rank != pcfg.R {
			pcfg.RankPattern = append(pcfg.RankPattern, export.Pattern[int]{Key: long[i].Name, Value: long[i].Rank})
			pcfg.AlphaPattern = append(pcfg.AlphaPattern, export.Pattern[float64]{Key: long[i].Name, Value: long[i].Alpha})
		}
	}
	if err := export.WritePEFTAdapter(prefixed, &pcfg, long); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(tmp, "plain.onnx_adapter")
	mustRun(t, "convert-adapter", filepath.Join(adaptersTestdata, "peft-plain"), "-o", plain)
	mapped := filepath.Join(tmp, "mapped.onnx_adapter")
	r := mustRun(t, "convert-adapter", prefixed, "-o", mapped, "--model", model)
	if !strings.Contains(r.stderr, "PEFT module model.decoder.layers.0.proj -> model input layers.0.proj.lora_A.weight") {
		t.Errorf("stderr: %s", r.stderr)
	}
	a, err := export.ReadOnnxAdapter(plain)
	if err != nil {
		t.Fatal(err)
	}
	b, err := export.ReadOnnxAdapter(mapped)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a.Params, b.Params) {
		t.Error("the --model conversion of the prefixed dir differs from the plain conversion")
	}

	// A module whose shapes do not fit: layers.1.proj (6 -> 5) renamed to
	// layers.0.proj, whose inputs are [8, r] and [r, 6].
	wrong := filepath.Join(tmp, "wrong")
	w := []export.PEFTModule{mods[1]}
	w[0].Name = "layers.0.proj"
	if err := export.WritePEFTAdapter(wrong, export.NewPEFTConfig(w[0].Rank, w[0].Alpha), w); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"shape", []string{wrong, "--model", model}, "gives layers.0.proj.lora_A.weight shape [6 2], but model input layers.0.proj.lora_A.weight has dim 0 = 8"},
		{"dtype", []string{filepath.Join(adaptersTestdata, "peft-plain"), "--model", model, "--dtype", "float16"}, "--dtype float16, but model input"},
		{"no lora inputs", []string{filepath.Join(adaptersTestdata, "peft-plain"), "--model", filepath.Join(adaptersTestdata, "base.onnx")}, "has no LoRA adapter inputs"},
		{"not a model", []string{filepath.Join(adaptersTestdata, "peft-plain"), "--model", filepath.Join(adaptersTestdata, "adapter1.onnx_adapter")}, "onnxlora: "},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(tmp, c.name+".onnx_adapter")
			r := run(t, append([]string{"convert-adapter", "-o", out}, c.args...)...)
			if r.code != 1 || !strings.Contains(r.stderr, c.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
				t.Fatalf("exit %d, stderr %q; want exit 1 and one line with %q", r.code, r.stderr, c.want)
			}
			if _, err := os.Stat(out); err == nil {
				t.Error("output written")
			}
		})
	}
	if r := run(t, "convert-adapter", filepath.Join(adaptersTestdata, "adapter1.onnx_adapter"), "-o", filepath.Join(tmp, "d"), "--model", model); r.code != 2 {
		t.Errorf("--model with an .onnx_adapter input: exit %d", r.code)
	}
}
