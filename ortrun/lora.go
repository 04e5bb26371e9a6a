package ortrun

import (
	"errors"
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
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.c != nil {
		cReleaseAdapter(a.c)
		a.c = nil
	}
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
	c := s.c
	if c == nil {
		return nil, errors.New("ort: session is closed")
	}
	if err := s.checkInputs(inputs); err != nil {
		return nil, err
	}
	for _, name := range outputs {
		if !hasInfo(s.outputs, name) {
			return nil, fmt.Errorf("ort: %s has no output %q", s.path, name)
		}
	}
	// Hold every adapter shared for the run so Close cannot free it
	// underneath ORT.
	adapters := make([]*cAdapter, 0, len(opts.Adapters))
	for i, a := range opts.Adapters {
		if a == nil {
			return nil, fmt.Errorf("ort: adapter %d is nil", i)
		}
		for _, b := range opts.Adapters[:i] {
			if a == b {
				return nil, fmt.Errorf("ort: adapter %s given twice", a.name)
			}
		}
		a.mu.RLock()
		defer a.mu.RUnlock()
		if a.c == nil {
			return nil, fmt.Errorf("ort: adapter %s is closed", a.name)
		}
		adapters = append(adapters, a.c)
	}
	if err := s.checkAdapters(inputs, opts.Adapters); err != nil {
		return nil, err
	}

	values := make([]*cValue, len(inputs))
	defer func() {
		for _, v := range values {
			if v != nil {
				cReleaseValue(v)
			}
		}
	}()
	inNames := make([]string, len(inputs))
	for i, t := range inputs {
		v, err := cNewTensor(t.Shape, int(t.DType), t.Data)
		if err != nil {
			return nil, fmt.Errorf("ort: input %q: %w", t.Name, err)
		}
		values[i], inNames[i] = v, t.Name
	}
	outs := make([]*cValue, len(outputs))
	defer func() {
		for _, v := range outs {
			if v != nil {
				cReleaseValue(v)
			}
		}
	}()
	if err := cRunAdapters(c, adapters, inNames, values, outputs, outs); err != nil {
		return nil, fmt.Errorf("ort: running %s: %w", s.path, err)
	}
	result := make([]Tensor, len(outputs))
	for i, v := range outs {
		if v == nil {
			return nil, fmt.Errorf("ort: output %q was not produced", outputs[i])
		}
		et, shape, data, onnxType, err := cValueTensor(v)
		if err != nil {
			return nil, fmt.Errorf("ort: reading output %q: %w", outputs[i], err)
		}
		if onnxType != onnxTypeTensor || DType(et) == String {
			return nil, fmt.Errorf("ort: output %q is not a numeric tensor", outputs[i])
		}
		result[i] = Tensor{Name: outputs[i], DType: DType(et), Shape: shape, Data: data}
	}
	return result, nil
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
			var info *TensorInfo
			for _, list := range [][]TensorInfo{s.inputs, s.overridable} {
				for i := range list {
					if list[i].Name == p.Name {
						info = &list[i]
					}
				}
			}
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
