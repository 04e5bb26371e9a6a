package rewrite

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph"
)

// StartAdapterInputs gives every adapter-input branch of the model (inject
// --adapter-inputs) starting factors of rank r in its initializer
// defaults, so the model can be trained: A [in, r] drawn as Inject draws
// it (cfg.Init and cfg.Seed, per module, the same values Inject would give
// a branch with constant factors) and B [r, out] zero, so the model still
// computes the base. Training then changes the defaults, which
// ExportOnnxAdapter writes out and Merge folds. There is no scaling in this
// mode: B holds it, so training B directly corresponds to PEFT's B scaled
// by alpha/r (with Adam, a learning rate on B scaled by the same factor).
// It returns the names of the factors, the trainable list.
func StartAdapterInputs(m *graph.Model, r int, cfg InjectConfig) ([]string, error) {
	if r <= 0 {
		return nil, fmt.Errorf("rank must be positive, got %d", r)
	}
	if cfg.Init == "" {
		cfg.Init = InitKaiming
	}
	if cfg.Init != InitKaiming && cfg.Init != InitGaussian {
		return nil, fmt.Errorf("init %q does not apply to adapter inputs: use %q or %q", cfg.Init, InitKaiming, InitGaussian)
	}
	top := m.Graph()
	found, _, _, err := findAdapters(m, top)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range found {
		if !f.isInputs() {
			continue
		}
		if f.TA == nil || f.TB == nil {
			return nil, fmt.Errorf("adapter %s: inputs %s and %s have no initializer defaults to start from", f.Module, f.A, f.B)
		}
		l := f.Layer
		rr := int64(r)
		ta, err := graph.NewFloatTensor(f.A, l.DType, []int64{l.In, rr}, initA(f.Module, l.In, rr, cfg))
		if err != nil {
			return nil, err
		}
		tb, err := graph.NewFloatTensor(f.B, l.DType, []int64{rr, l.Out}, make([]float64, rr*l.Out))
		if err != nil {
			return nil, err
		}
		// In place: the graph keeps pointing at the same tensors.
		proto.Reset(f.TA)
		proto.Merge(f.TA, ta)
		proto.Reset(f.TB)
		proto.Merge(f.TB, tb)
		names = append(names, f.A, f.B)
	}
	if len(names) == 0 {
		return nil, errors.New("the model has no adapter inputs (make them with inject --adapter-inputs)")
	}
	return names, nil
}
