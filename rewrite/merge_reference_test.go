package rewrite

import (
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// The merge, every way it is run (in memory, streamed to an inline model,
// streamed to external data), must give exactly the bytes of a plain
// reference: W + (alpha/r)·A·B summed over k in order in float64, rounded
// once to the weight's type. The rounding here is written independently of
// graph's codec: every finite value of the 16-bit types is listed from its
// bit fields, and the nearest is picked, ties to the even bit pattern.

// refValues16 lists the finite values of a 16-bit float type with expBits
// exponent bits, sorted, with their bit patterns.
func refValues16(expBits int) (vals []float64, bits []uint16) {
	manBits := 15 - expBits
	bias := 1<<(expBits-1) - 1
	type pair struct {
		v float64
		b uint16
	}
	var ps []pair
	for h := 0; h < 1<<16; h++ {
		e := (h >> manBits) & (1<<expBits - 1)
		f := h & (1<<manBits - 1)
		if e == 1<<expBits-1 {
			continue // infinities and NaN
		}
		var v float64
		if e == 0 {
			v = math.Ldexp(float64(f), 1-bias-manBits)
		} else {
			v = math.Ldexp(float64(f|1<<manBits), e-bias-manBits)
		}
		if h>>15 == 1 {
			if v == 0 {
				continue // keep +0 for zero
			}
			v = -v
		}
		ps = append(ps, pair{v, uint16(h)})
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].v < ps[j].v })
	for _, p := range ps {
		vals, bits = append(vals, p.v), append(bits, p.b)
	}
	return vals, bits
}

// refRound16 rounds x to the nearest listed value, ties to the even
// pattern. The tests keep values far inside the finite range.
func refRound16(vals []float64, bits []uint16, x float64) uint16 {
	i := sort.SearchFloat64s(vals, x)
	if i < len(vals) && vals[i] == x {
		return bits[i]
	}
	lo, hi := i-1, i
	dl, dh := x-vals[lo], vals[hi]-x
	switch {
	case dl < dh:
		return bits[lo]
	case dh < dl:
		return bits[hi]
	case bits[lo]&1 == 0:
		return bits[lo]
	default:
		return bits[hi]
	}
}

func TestMergeMatchesPlainReference(t *testing.T) {
	f16v, f16b := refValues16(5)
	bf16v, bf16b := refValues16(8)
	for _, dt := range []graph.DataType{graph.Float, graph.Float16, graph.BFloat16} {
		t.Run(dt.String(), func(t *testing.T) {
			const in, out, r, alpha = 72, 101, 5, 7.0 // tails past the vector widths
			rng := rand.New(rand.NewPCG(uint64(dt), 3))
			// Base weights: random values rounded to dt, so the file holds
			// them exactly.
			w := make([]float64, in*out)
			for i := range w {
				w[i] = rng.NormFloat64() / 8
			}
			wt, err := graph.NewFloatTensor("w", dt, []int64{in, out}, w)
			if err != nil {
				t.Fatal(err)
			}
			g := &onnxpb.GraphProto{
				Name:        proto.String("g"),
				Input:       []*onnxpb.ValueInfoProto{mgValueInfo("x", dt, 2, in)},
				Output:      []*onnxpb.ValueInfoProto{mgValueInfo("y", dt, 2, out)},
				Initializer: []*onnxpb.TensorProto{wt},
				Node:        []*onnxpb.NodeProto{mgTestNode("MatMul", "/proj/MatMul", []string{"x", "w"}, []string{"y"})},
			}
			dir := t.TempDir()
			base := mgWriteTestModel(t, filepath.Join(dir, "base.onnx"), g)
			m, err := graph.Load(base)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Inject(m, InjectConfig{SelectOptions: SelectOptions{TargetRegex: ".*", Rank: r, Alpha: alpha}}); err != nil {
				t.Fatal(err)
			}
			mgRandomizeAdapters(t, m, 11)
			man, err := ReadManifest(m)
			if err != nil || len(man.Adapters) != 1 {
				t.Fatalf("manifest: %v", err)
			}
			a := mgFloatsOf(t, m, mgTensorByName(m, man.Adapters[0].LoraA))
			b := mgFloatsOf(t, m, mgTensorByName(m, man.Adapters[0].LoraB))
			wv := mgFloatsOf(t, m, mgTensorByName(m, "w"))
			injected := mgSaveModel(t, m, filepath.Join(dir, "injected.onnx"))

			// The reference, written out plainly.
			coef := alpha / r
			want := make([]byte, 0, in*out*4)
			for p := 0; p < in; p++ {
				for q := 0; q < out; q++ {
					s := 0.0
					for k := 0; k < r; k++ {
						// float64() forbids fusing into an FMA: one rounding per step.
						s += float64(a[p*r+k] * b[k*out+q])
					}
					base := wv[p*out+q]
					x := base + float64(coef*s)
					switch dt {
					case graph.Float:
						want = append(want, le32(math.Float32bits(float32(x)))...)
					case graph.Float16:
						h := refRound16(f16v, f16b, x)
						want = append(want, byte(h), byte(h>>8))
					default:
						h := refRound16(bf16v, bf16b, x)
						want = append(want, byte(h), byte(h>>8))
					}
				}
			}

			check := func(how string, mm *graph.Model) {
				t.Helper()
				tp := mgTensorByName(mm, "w")
				if tp == nil {
					t.Fatalf("%s: no weight w", how)
				}
				got := mgRawOf(t, mm, tp)
				if len(got) != len(want) {
					t.Fatalf("%s: %d bytes, want %d", how, len(got), len(want))
				}
				for i := range got {
					if got[i] != want[i] {
						t.Fatalf("%s: byte %d differs from the reference", how, i)
					}
				}
			}
			// In memory.
			mem, err := graph.Load(injected)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Merge(mem, MergeOptions{}); err != nil {
				t.Fatal(err)
			}
			check("Merge", mem)
			// Streamed, inline and external.
			for _, c := range []struct {
				name string
				save graph.SaveOptions
			}{{"inline", graph.SaveOptions{}}, {"external", graph.SaveOptions{External: graph.ExternalAlways}}} {
				outPath := filepath.Join(dir, c.name, "merged.onnx")
				if err := os.MkdirAll(filepath.Dir(outPath), 0o755); err != nil {
					t.Fatal(err)
				}
				if _, err := MergeFile(injected, outPath, MergeOptions{}, c.save); err != nil {
					t.Fatal(err)
				}
				merged, err := graph.Load(outPath)
				if err != nil {
					t.Fatal(err)
				}
				check("MergeFile "+c.name, merged)
				merged.Close()
			}
		})
	}
}

func le32(v uint32) []byte { return []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)} }
