package ortrun

import (
	"errors"
	"fmt"
	"sync"

	"github.com/onnxlora/onnxlora/graph"
)

// OptLevel is ORT's graph optimization level.
type OptLevel int

// Graph optimization levels. The zero value is ORT's own default, OptAll.
const (
	OptAll OptLevel = iota
	OptDisabled
	OptBasic
	OptExtended
)

// ortLevel maps an OptLevel to ORT's GraphOptimizationLevel values.
func (l OptLevel) ortLevel() (int, error) {
	switch l {
	case OptAll:
		return 99, nil
	case OptDisabled:
		return 0, nil
	case OptBasic:
		return 1, nil
	case OptExtended:
		return 2, nil
	}
	return 0, fmt.Errorf("unknown optimization level %d", int(l))
}

// Options tunes a Session. The zero value is the default.
type Options struct {
	// IntraOpThreads is the thread count inside one operator; 0 means 1, so
	// reductions are summed in a fixed order and runs are reproducible.
	IntraOpThreads int
	// Optimization is the graph optimization level (default OptAll).
	Optimization OptLevel
}

// TensorInfo describes a graph input or output as ORT sees it.
type TensorInfo struct {
	// Name is the input or output name.
	Name string
	// DType is the element type; Undefined when IsTensor is false.
	DType DType
	// Shape holds the dims, -1 where a dim is symbolic or unknown.
	Shape []int64
	// DimNames holds the symbolic name of each dim ("" if none).
	DimNames []string
	// IsTensor is false for sequence, map and other non-tensor values,
	// which Run does not support.
	IsTensor bool
}

// Session is a loaded model. Run may be called from several goroutines at
// once; Close must not overlap with Run.
type Session struct {
	path    string
	mu      sync.Mutex // guards c against a double Close
	c       *cSession
	inputs  []TensorInfo
	outputs []TensorInfo
	// overridable are initializers that are also graph inputs: Run may
	// feed them, and uses their stored values when it does not.
	overridable []TensorInfo
}

// ioKind selects what cSessionIO lists.
type ioKind int

const (
	ioInputs ioKind = iota
	ioOutputs
	ioOverridable
)

// Open loads the model at path (nil opts means defaults). External data
// files are looked up relative to the model's folder, as ORT does. The error
// wraps ErrNoLibrary when ORT is not installed.
func Open(path string, opts *Options) (*Session, error) {
	if err := Init(); err != nil {
		return nil, err
	}
	intra, level, err := sessionSettings(opts)
	if err != nil {
		return nil, err
	}
	// ORT opens the file itself and would block forever on a FIFO.
	if err := graph.CheckRegular(path); err != nil {
		return nil, fmt.Errorf("ort: opening %w", err)
	}
	c, err := cCreateSession(path, intra, 1, level)
	if err != nil {
		return nil, fmt.Errorf("ort: opening %s: %w", path, err)
	}
	return newSession(path, c)
}

// sessionSettings reads the intra-op thread count (at least 1) and ORT's
// optimization level from opts; nil means defaults.
func sessionSettings(opts *Options) (intra, level int, err error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	level, err = o.Optimization.ortLevel()
	return max(o.IntraOpThreads, 1), level, err
}

// newSession wraps an opened C session, reading its inputs, outputs and
// overridable initializers; on error it releases c.
func newSession(path string, c *cSession) (*Session, error) {
	s := &Session{path: path, c: c}
	ins, err := cSessionIO(c, ioInputs)
	if err == nil {
		s.inputs = toTensorInfos(ins)
		var outs []ioInfo
		outs, err = cSessionIO(c, ioOutputs)
		s.outputs = toTensorInfos(outs)
	}
	if err == nil {
		var over []ioInfo
		over, err = cSessionIO(c, ioOverridable)
		s.overridable = toTensorInfos(over)
	}
	if err != nil {
		cReleaseSession(c)
		return nil, fmt.Errorf("ort: reading inputs and outputs of %s: %w", path, err)
	}
	return s, nil
}

func toTensorInfos(ios []ioInfo) []TensorInfo {
	out := make([]TensorInfo, len(ios))
	for i, io := range ios {
		out[i] = TensorInfo{Name: io.name, Shape: io.dims, DimNames: io.dimNames, IsTensor: io.onnxType == onnxTypeTensor}
		if out[i].IsTensor {
			out[i].DType = DType(io.elemType)
		}
	}
	return out
}

// Path returns the model path the session was opened from.
func (s *Session) Path() string { return s.path }

// Inputs describes the graph inputs in graph order (initializers that are
// also listed as inputs included, since ORT lets callers override them).
func (s *Session) Inputs() []TensorInfo { return cloneInfos(s.inputs) }

// Outputs describes the graph outputs in graph order.
func (s *Session) Outputs() []TensorInfo { return cloneInfos(s.outputs) }

// OverridableInitializers describes the initializers that are also graph
// inputs (IR >= 4): Run accepts them as inputs, such as the trainable
// parameters of a step graph or the LoRA weights of an adapter-input model.
func (s *Session) OverridableInitializers() []TensorInfo { return cloneInfos(s.overridable) }

func cloneInfos(in []TensorInfo) []TensorInfo {
	out := make([]TensorInfo, len(in))
	for i, t := range in {
		t.Shape = append([]int64{}, t.Shape...)
		t.DimNames = append([]string{}, t.DimNames...)
		out[i] = t
	}
	return out
}

// Run feeds inputs (matched by Name, in any order) and returns every graph
// output, in Outputs order.
func (s *Session) Run(inputs []Tensor) ([]Tensor, error) {
	names := make([]string, len(s.outputs))
	for i, o := range s.outputs {
		names[i] = o.Name
	}
	return s.RunOutputs(inputs, names)
}

// RunOutputs is Run for the named outputs only, returned in that order;
// ORT then skips work that only other outputs need.
func (s *Session) RunOutputs(inputs []Tensor, outputs []string) ([]Tensor, error) {
	return s.run(inputs, outputs, nil)
}

// run checks inputs, outputs and adapters, feeds ORT and copies the named
// outputs back; with no adapters it runs without run options.
func (s *Session) run(inputs []Tensor, outputs []string, adapters []*Adapter) ([]Tensor, error) {
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
	cAdapters := make([]*cAdapter, 0, len(adapters))
	for i, a := range adapters {
		if a == nil {
			return nil, fmt.Errorf("ort: adapter %d is nil", i)
		}
		for _, b := range adapters[:i] {
			if a == b {
				return nil, fmt.Errorf("ort: adapter %s given twice", a.name)
			}
		}
		a.mu.RLock()
		defer a.mu.RUnlock()
		if a.c == nil {
			return nil, fmt.Errorf("ort: adapter %s is closed", a.name)
		}
		cAdapters = append(cAdapters, a.c)
	}
	if err := s.checkAdapters(inputs, adapters); err != nil {
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
	var err error
	if len(cAdapters) == 0 {
		err = cRun(c, inNames, values, outputs, outs)
	} else {
		err = cRunAdapters(c, cAdapters, inNames, values, outputs, outs)
	}
	if err != nil {
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
		if onnxType != onnxTypeTensor {
			return nil, fmt.Errorf("ort: output %q is not a tensor (ONNXType %d)", outputs[i], onnxType)
		}
		if DType(et) == String {
			return nil, fmt.Errorf("ort: output %q is a string tensor, which is not supported", outputs[i])
		}
		result[i] = Tensor{Name: outputs[i], DType: DType(et), Shape: shape, Data: data}
	}
	return result, nil
}

// checkInputs rejects unknown, repeated, missing and mistyped inputs with
// messages that name the tensor, before ORT sees them.
func (s *Session) checkInputs(inputs []Tensor) error {
	seen := make(map[string]bool, len(inputs))
	for _, t := range inputs {
		info := s.feedable(t.Name)
		if info == nil {
			return fmt.Errorf("ort: %s has no input %q", s.path, t.Name)
		}
		if seen[t.Name] {
			return fmt.Errorf("ort: input %q given twice", t.Name)
		}
		seen[t.Name] = true
		if !info.IsTensor {
			return fmt.Errorf("ort: input %q is not a tensor input", t.Name)
		}
		if t.DType != info.DType {
			return fmt.Errorf("ort: input %q is %v, model wants %v", t.Name, t.DType, info.DType)
		}
		if err := t.Validate(); err != nil {
			return fmt.Errorf("ort: %w", err)
		}
	}
	return nil
}

// feedable finds the graph input or overridable initializer called name;
// nil if there is none.
func (s *Session) feedable(name string) *TensorInfo {
	var info *TensorInfo
	for _, list := range [][]TensorInfo{s.inputs, s.overridable} {
		for i := range list {
			if list[i].Name == name {
				info = &list[i]
			}
		}
	}
	return info
}

func hasInfo(infos []TensorInfo, name string) bool {
	for _, i := range infos {
		if i.Name == name {
			return true
		}
	}
	return false
}

// Close frees the session. It is safe to call more than once.
func (s *Session) Close() error {
	releaseOnce(&s.mu, &s.c, cReleaseSession)
	return nil
}

// releaseOnce frees *c under mu and clears it, so a second call does
// nothing.
func releaseOnce[P comparable](mu sync.Locker, c *P, release func(P)) {
	mu.Lock()
	defer mu.Unlock()
	var none P
	if *c != none {
		release(*c)
		*c = none
	}
}

// onnxTypeTensor is ORT's ONNX_TYPE_TENSOR.
const onnxTypeTensor = 1

// ioInfo describes a session input or output as the C layer reports it.
type ioInfo struct {
	name     string
	onnxType int
	elemType int
	dims     []int64
	dimNames []string
}
