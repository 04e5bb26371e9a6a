package ortrun

import (
	"fmt"
	"sync"

	"github.com/onnxlora/onnxlora/export"
)

// Adapter is an ONNX Runtime LoRA adapter (an .onnx_adapter file loaded
// with OrtApi::CreateLoraAdapter). While it is active on a run, ORT feeds
// each of its parameters to the graph input of the same name, so one
// session of an adapter-input model serves any number of adapters. An
// Adapter may be used by several runs and sessions at once; Close waits
// for the runs using it.
type Adapter struct {
	name   string
	params []AdapterParam
	mu     sync.RWMutex // runs hold it shared; Close exclusively
	c      *cAdapter
}

// AdapterParam describes one parameter of an Adapter.
type AdapterParam struct {
	Name  string
	DType DType
	Shape []int64
}

// LoadAdapter verifies the adapter file at path with the export package's
// reader (so a corrupt file is one clear error) and loads it with ORT,
// which memory-maps it. The error wraps ErrNoLibrary when ORT is missing.
func LoadAdapter(path string) (*Adapter, error) {
	a, err := export.ReadOnnxAdapter(path)
	if err != nil {
		return nil, err
	}
	if err := Init(); err != nil {
		return nil, err
	}
	c, err := cCreateAdapter(path)
	if err != nil {
		return nil, fmt.Errorf("ort: loading adapter %s: %w", path, err)
	}
	return newAdapter(path, a, c), nil
}

// NewAdapterFromBytes makes an adapter from the bytes of an .onnx_adapter
// file; ORT copies them, so buf may be reused afterwards. name is used in
// errors.
func NewAdapterFromBytes(buf []byte, name string) (*Adapter, error) {
	a, err := export.ParseOnnxAdapter(buf, name)
	if err != nil {
		return nil, err
	}
	if err := Init(); err != nil {
		return nil, err
	}
	c, err := cCreateAdapterFromBytes(buf)
	if err != nil {
		return nil, fmt.Errorf("ort: loading adapter %s: %w", name, err)
	}
	return newAdapter(name, a, c), nil
}

// NewAdapter makes an adapter from an in-memory export.OnnxAdapter.
func NewAdapter(a *export.OnnxAdapter, name string) (*Adapter, error) {
	buf, err := a.Marshal()
	if err != nil {
		return nil, fmt.Errorf("adapter %s: %w", name, err)
	}
	return NewAdapterFromBytes(buf, name)
}

func newAdapter(name string, a *export.OnnxAdapter, c *cAdapter) *Adapter {
	ad := &Adapter{name: name, c: c, params: make([]AdapterParam, len(a.Params))}
	for i, p := range a.Params {
		ad.params[i] = AdapterParam{Name: p.Name, DType: DType(p.DataType), Shape: append([]int64{}, p.Dims...)}
	}
	return ad
}

// Name returns the path or name the adapter was made from.
func (a *Adapter) Name() string { return a.name }

// Params describes the adapter's parameters in file order.
func (a *Adapter) Params() []AdapterParam {
	out := make([]AdapterParam, len(a.params))
	for i, p := range a.params {
		p.Shape = append([]int64{}, p.Shape...)
		out[i] = p
	}
	return out
}

// Close frees the adapter once no run uses it. It is safe to call more
// than once; a closed adapter cannot be made active.
func (a *Adapter) Close() error {
	releaseOnce(&a.mu, &a.c, cReleaseAdapter)
	return nil
}

// RunOptions are per-run settings for Session.RunWith.
type RunOptions struct {
	// Adapters are made active for this run only (ORT's
	// RunOptionsAddActiveLoraAdapter). Their parameters must be graph
	// inputs of matching type and shape and must not overlap with each
	// other or with the inputs given explicitly. None means the model's
	// own initializer defaults (for an adapter-input model, the base).
	Adapters []*Adapter
}

// RunWith is RunOutputs with per-run options; nil outputs means every
// graph output, in Outputs order.
func (s *Session) RunWith(inputs []Tensor, outputs []string, opts RunOptions) ([]Tensor, error) {
	if outputs == nil {
		outputs = make([]string, len(s.outputs))
		for i, o := range s.outputs {
			outputs[i] = o.Name
		}
	}
	return s.run(inputs, outputs, opts.Adapters)
}

// checkAdapters rejects adapter parameters the model has no input for, of
// the wrong type or shape, or fed twice, naming the parameter, before ORT
// sees them.
func (s *Session) checkAdapters(inputs []Tensor, adapters []*Adapter) error {
	fed := make(map[string]string, len(inputs))
	for _, t := range inputs {
		fed[t.Name] = "the inputs"
	}
	for _, a := range adapters {
		for _, p := range a.params {
			// Adapter parameters are normally overridable initializers
			// (inputs with rank-0 defaults); plain inputs work too.
			info := s.feedable(p.Name)
			if info == nil {
				return fmt.Errorf("ort: adapter %s: parameter %q is not an input of %s", a.name, p.Name, s.path)
			}
			if by, ok := fed[p.Name]; ok {
				return fmt.Errorf("ort: adapter %s: parameter %q is also given by %s", a.name, p.Name, by)
			}
			fed[p.Name] = "adapter " + a.name
			if info.DType != p.DType {
				return fmt.Errorf("ort: adapter %s: parameter %q is %v, model input is %v", a.name, p.Name, p.DType, info.DType)
			}
			if !shapeFits(p.Shape, info.Shape) {
				return fmt.Errorf("ort: adapter %s: parameter %q has shape %v, model input wants %s", a.name, p.Name, p.Shape, shapeString(info))
			}
		}
	}
	return nil
}

// shapeFits reports whether shape matches want, where -1 is any size.
func shapeFits(shape, want []int64) bool {
	if len(shape) != len(want) {
		return false
	}
	for i, d := range want {
		if d >= 0 && shape[i] != d {
			return false
		}
	}
	return true
}

// shapeString prints an input's shape with its symbolic dim names.
func shapeString(info *TensorInfo) string {
	out := "["
	for i, d := range info.Shape {
		if i > 0 {
			out += " "
		}
		switch {
		case d >= 0:
			out += fmt.Sprint(d)
		case i < len(info.DimNames) && info.DimNames[i] != "":
			out += info.DimNames[i]
		default:
			out += "?"
		}
	}
	return out + "]"
}
