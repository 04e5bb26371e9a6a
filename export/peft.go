package export

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// File names inside a PEFT adapter directory.
const (
	PEFTConfigFile  = "adapter_config.json"
	PEFTWeightsFile = "adapter_model.safetensors"
)

// PEFTKeyPrefix is the prefix PEFT puts before module paths in saved keys
// (PeftModel.base_model is a LoraModel whose .model is the wrapped model).
const PEFTKeyPrefix = "base_model.model."

// ErrUnsupported is wrapped by errors about PEFT features this package does
// not model; test for it with errors.Is.
var ErrUnsupported = errors.New("unsupported PEFT feature")

// PEFTModule is one LoRA-adapted layer: delta W = Scaling * B @ A, with W of
// shape [OutFeatures, InFeatures] as in torch.nn.Linear.
type PEFTModule struct {
	// Name is the module path inside the base model, for example
	// "model.layers.0.self_attn.q_proj".
	Name string
	// Prefix is what preceded Name in the keys, normally PEFTKeyPrefix.
	Prefix string
	// AdapterName is the adapter segment of ".lora_A.<name>.weight" keys,
	// "" for the usual ".lora_A.weight" form.
	AdapterName string
	KeyA, KeyB  string // full tensor keys in the file
	DType       DType  // element type of both tensors in the file
	Rank        int
	InFeatures  int
	OutFeatures int
	Alpha       float64 // resolved through alpha_pattern
	Scaling     float64 // Alpha/Rank, or Alpha/sqrt(Rank) with use_rslora
	// A and B are nil from ReadPEFTDirLazy until Load; Factors reads them.
	A []float32 // lora_A weight, [Rank, InFeatures] row-major
	B []float32 // lora_B weight, [OutFeatures, Rank] row-major
	// Embedding marks LoRA on an nn.Embedding: the keys are
	// <module>.lora_embedding_A and .lora_embedding_B (parameters, no
	// ".weight"), A is [Rank, num_embeddings] and B [embedding_dim, Rank],
	// so InFeatures is the vocabulary size, OutFeatures the embedding width,
	// and the delta on the [num_embeddings, embedding_dim] table is
	// Scaling·(B·A)ᵀ.
	Embedding bool
	// Kernel is the spatial kernel of a Conv LoRA module (PEFT's
	// lora.Conv1d/2d/3d), nil for Linear: A is then [Rank, InFeatures,
	// Kernel…] (the base's kernel) and B [OutFeatures, Rank, 1…], and the
	// delta is Scaling·B·A on the kernel flattened to [out, in·K].
	Kernel []int
	// Magnitude is DoRA's lora_magnitude_vector (use_dora), one value per
	// output feature, under key KeyM; nil without DoRA. PEFT stores it as
	// [OutFeatures] for Linear and [1, OutFeatures, 1…] for Conv.
	Magnitude []float32
	KeyM      string

	src *SafetensorsFile // where Factors reads A and B (ReadPEFTDirLazy)
}

// PEFTSaved is one tensor of a modules_to_save module: a full trained copy
// of a base parameter (a sequence classifier's "classifier.weight", say),
// which replaces the base value instead of adding a delta.
type PEFTSaved struct {
	// Module is the module path ("classifier", "score",
	// "classifier.out_proj") and Param the parameter ("weight", "bias").
	Module, Param string
	// Key is the tensor's key in the file, in either layout PEFT uses:
	// base_model.model.<module>.<param> (save_pretrained) or
	// base_model.model.<module>.modules_to_save.<adapter>.<param> (the
	// wrapped model's own state_dict).
	Key    string
	DType  DType
	Shape  []int
	Values []float32
}

// PEFTAdapter is everything a PEFT LoRA adapter directory holds.
type PEFTAdapter struct {
	Config  *PEFTConfig
	Modules []PEFTModule // LoRA modules, sorted by Name
	Saved   []PEFTSaved  // modules_to_save tensors, sorted by Module, Param

	file *SafetensorsFile // open while the modules' factors are unread
}

// Close closes the weights file ReadPEFTDirLazy left open; after it,
// Factors and Load work only for modules already loaded.
func (a *PEFTAdapter) Close() error {
	if a.file == nil {
		return nil
	}
	err := a.file.Close()
	a.file = nil
	for i := range a.Modules {
		a.Modules[i].src = nil
	}
	return err
}

// Factors returns the module's A and B: those it holds, or else read from
// the adapter file (ReadPEFTDirLazy) without keeping them.
func (m *PEFTModule) Factors() (a, b []float32, err error) {
	if m.A != nil && m.B != nil {
		return m.A, m.B, nil
	}
	if m.src == nil {
		return nil, nil, fmt.Errorf("peft module %s: its factors were not read and the adapter file is closed", m.Name)
	}
	if a, err = m.src.ReadFloat32(m.KeyA); err != nil {
		return nil, nil, err
	}
	if b, err = m.src.ReadFloat32(m.KeyB); err != nil {
		return nil, nil, err
	}
	return a, b, nil
}

// Load reads the module's A and B into it when they are not there yet.
func (m *PEFTModule) Load() error {
	a, b, err := m.Factors()
	if err == nil {
		m.A, m.B = a, b
	}
	return err
}

// ShapeA returns the lora_A weight shape [Rank, InFeatures] ([Rank,
// InFeatures, Kernel…] for Conv).
func (m *PEFTModule) ShapeA() []int { return append([]int{m.Rank, m.InFeatures}, m.Kernel...) }

// ShapeB returns the lora_B weight shape [OutFeatures, Rank] ([OutFeatures,
// Rank, 1…] for Conv).
func (m *PEFTModule) ShapeB() []int { return append([]int{m.OutFeatures, m.Rank}, m.ones()...) }

// ShapeM returns the DoRA magnitude's shape as PEFT saves it: [OutFeatures]
// for Linear, [1, OutFeatures, 1…] for Conv.
func (m *PEFTModule) ShapeM() []int {
	if m.Kernel == nil {
		return []int{m.OutFeatures}
	}
	return append([]int{1, m.OutFeatures}, m.ones()...)
}

func (m *PEFTModule) ones() []int {
	ones := make([]int, len(m.Kernel))
	for i := range ones {
		ones[i] = 1
	}
	return ones
}

// ReadPEFTAdapter reads a PEFT LoRA adapter directory (adapter_config.json
// and adapter_model.safetensors). Modules are sorted by Name, with A and B
// loaded as float32 and rank, alpha and scaling resolved like PEFT does.
// Embedding LoRA and modules_to_save weights are refused (errors wrapping
// ErrUnsupported); ReadPEFTDir returns them.
func ReadPEFTAdapter(dir string) (*PEFTConfig, []PEFTModule, error) {
	if cfg, err := ReadPEFTConfig(filepath.Join(dir, PEFTConfigFile)); err == nil && cfg.UseDoRA {
		return nil, nil, fmt.Errorf("peft adapter %s: %w here: DoRA (use_dora=true); merge --adapter applies it", dir, ErrUnsupported)
	}
	a, err := ReadPEFTDir(dir)
	if err != nil {
		return nil, nil, err
	}
	if len(a.Saved) > 0 {
		return nil, nil, fmt.Errorf("peft adapter %s: %w: modules_to_save weights (key %q) replace whole layers", dir, ErrUnsupported, a.Saved[0].Key)
	}
	for _, m := range a.Modules {
		if m.Embedding {
			return nil, nil, fmt.Errorf("peft adapter %s: %w: LoRA on an Embedding layer (key %q)", dir, ErrUnsupported, m.KeyA)
		}
		if m.Kernel != nil {
			return nil, nil, fmt.Errorf("peft adapter %s: %w here: Conv LoRA (key %q); merge --adapter applies it", dir, ErrUnsupported, m.KeyA)
		}
		if m.Magnitude != nil {
			return nil, nil, fmt.Errorf("peft adapter %s: %w here: DoRA magnitude vector (key %q); merge --adapter applies it", dir, ErrUnsupported, m.KeyM)
		}
	}
	return a.Config, a.Modules, nil
}

// ReadPEFTDir reads a PEFT LoRA adapter directory with its embedding LoRA
// modules and its modules_to_save tensors.
func ReadPEFTDir(dir string) (*PEFTAdapter, error) {
	return readPEFTDir(dir, false)
}

// ReadPEFTDirLazy is ReadPEFTDir that leaves the LoRA modules' A and B in
// the weights file, which it keeps open: Factors reads them when needed,
// so a merge holds one module's factors at a time. Call Close when done.
func ReadPEFTDirLazy(dir string) (*PEFTAdapter, error) {
	return readPEFTDir(dir, true)
}

func readPEFTDir(dir string, lazy bool) (*PEFTAdapter, error) {
	cfg, err := ReadPEFTConfig(filepath.Join(dir, PEFTConfigFile))
	if err != nil {
		return nil, err
	}
	f, err := openPEFTWeights(dir)
	if err != nil {
		return nil, err
	}
	mods, saved, err := collectModules(f, cfg, lazy)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("peft adapter %s: %w", f.path, err)
	}
	a := &PEFTAdapter{Config: cfg, Modules: mods, Saved: saved}
	if !lazy {
		f.Close()
		return a, nil
	}
	a.file = f
	for i := range a.Modules {
		a.Modules[i].src = f
	}
	return a, nil
}

func openPEFTWeights(dir string) (*SafetensorsFile, error) {
	wpath := filepath.Join(dir, PEFTWeightsFile)
	if _, err := os.Stat(wpath); errors.Is(err, os.ErrNotExist) {
		if _, berr := os.Stat(filepath.Join(dir, "adapter_model.bin")); berr == nil {
			return nil, fmt.Errorf("peft adapter %s: only %s is supported, found adapter_model.bin (a pickle); convert it to safetensors", dir, PEFTWeightsFile)
		}
	}
	return OpenSafetensors(wpath)
}

// loraKey is a parsed tensor key: a lora_A/lora_B (or embedding) factor,
// or a modules_to_save tensor when saved is set.
type loraKey struct {
	prefix, module, adapter string
	isB, embedding          bool
	isM                     bool // DoRA's lora_magnitude_vector
	saved                   bool
	param                   string // the parameter of a saved tensor ("weight")
}

// classifyKey parses a PEFT tensor key. It returns an error for keys of
// features this package refuses and for keys it does not recognise.
func classifyKey(key string, cfg *PEFTConfig) (loraKey, error) {
	prefix := ""
	rest := key
	if strings.HasPrefix(key, PEFTKeyPrefix) {
		prefix, rest = PEFTKeyPrefix, key[len(PEFTKeyPrefix):]
	}
	segs := strings.Split(rest, ".")
	for i := len(segs) - 1; i >= 0; i-- {
		switch segs[i] {
		case "lora_embedding_A", "lora_embedding_B":
			// ParameterDict entries: "<module>.lora_embedding_A" as saved,
			// "<module>.lora_embedding_A.<adapter>" in the live state_dict.
			tail := segs[i+1:]
			if i == 0 || len(tail) > 1 {
				return loraKey{}, fmt.Errorf("unrecognised embedding LoRA key %q", key)
			}
			adapter := ""
			if len(tail) == 1 {
				adapter = tail[0]
			}
			return loraKey{prefix: prefix, module: strings.Join(segs[:i], "."), adapter: adapter, isB: segs[i] == "lora_embedding_B", embedding: true}, nil
		case "lora_magnitude_vector":
			// "<module>.lora_magnitude_vector" as saved (PEFT drops the
			// DoRA layer's ".weight"), "<module>.lora_magnitude_vector.
			// <adapter>.weight" in the live state_dict.
			tail := segs[i+1:]
			adapter := ""
			switch {
			case len(tail) == 2 && tail[1] == "weight":
				adapter = tail[0]
			case len(tail) != 0 || i == 0:
				return loraKey{}, fmt.Errorf("unrecognised DoRA magnitude key %q", key)
			}
			return loraKey{prefix: prefix, module: strings.Join(segs[:i], "."), adapter: adapter, isM: true}, nil
		case "modules_to_save":
			// <module>.modules_to_save.<adapter>.<param path>
			tail := segs[i+1:]
			if i == 0 || len(tail) < 2 {
				return loraKey{}, fmt.Errorf("unrecognised modules_to_save key %q", key)
			}
			owner := append(append([]string(nil), segs[:i]...), tail[1:len(tail)-1]...)
			return loraKey{prefix: prefix, module: strings.Join(owner, "."), adapter: tail[0], saved: true, param: tail[len(tail)-1]}, nil
		case "lora_A", "lora_B":
			tail := segs[i+1:]
			var adapter, leaf string
			switch len(tail) {
			case 1:
				leaf = tail[0]
			case 2:
				adapter, leaf = tail[0], tail[1]
			default:
				return loraKey{}, fmt.Errorf("unrecognised LoRA key %q", key)
			}
			if leaf == "bias" {
				return loraKey{}, fmt.Errorf("%w: LoRA bias (key %q)", ErrUnsupported, key)
			}
			if leaf != "weight" || i == 0 {
				return loraKey{}, fmt.Errorf("unrecognised LoRA key %q", key)
			}
			return loraKey{prefix: prefix, module: strings.Join(segs[:i], "."), adapter: adapter, isB: segs[i] == "lora_B"}, nil
		}
	}
	// save_pretrained drops "modules_to_save.<adapter>.": the key is then
	// the base parameter's own name under a module that modules_to_save
	// names (PEFT's rule: the module path equals the entry or ends with
	// "." + entry).
	if len(segs) >= 2 {
		for j := 1; j < len(segs); j++ {
			mod := strings.Join(segs[:j], ".")
			for _, m := range cfg.ModulesToSave {
				if m != "" && (mod == m || strings.HasSuffix(mod, "."+m)) {
					return loraKey{prefix: prefix, module: strings.Join(segs[:len(segs)-1], "."), saved: true, param: segs[len(segs)-1]}, nil
				}
			}
		}
	}
	if segs[len(segs)-1] == "bias" {
		return loraKey{}, fmt.Errorf("%w: trained bias %q (bias=%q)", ErrUnsupported, key, cfg.Bias)
	}
	return loraKey{}, fmt.Errorf("unrecognised tensor %q (not a lora_A/lora_B weight, nor under a modules_to_save module)", key)
}

// modulePair gathers the two tensors of one module while scanning keys.
type modulePair struct {
	key          loraKey
	keyA, keyB   string
	infoA, infoB TensorInfo
	keyM         string // DoRA magnitude, "" without
	infoM        TensorInfo
}

// firstKey names a key already seen for the module, for error messages.
func (p *modulePair) firstKey() string {
	if p.keyA != "" {
		return p.keyA
	}
	return p.keyB
}

func collectModules(f *SafetensorsFile, cfg *PEFTConfig, lazy bool) ([]PEFTModule, []PEFTSaved, error) {
	byModule := map[string]*modulePair{}
	var saved []PEFTSaved
	savedKeys := map[string]string{}
	for _, name := range f.Names() {
		k, err := classifyKey(name, cfg)
		if err != nil {
			return nil, nil, err
		}
		if k.saved {
			id := k.module + "." + k.param
			if prev, dup := savedKeys[id]; dup {
				return nil, nil, fmt.Errorf("modules_to_save tensor %s appears twice (%q and %q)", id, prev, name)
			}
			savedKeys[id] = name
			info, _ := f.Tensor(name)
			if !info.DType.IsFloat() {
				return nil, nil, fmt.Errorf("modules_to_save tensor %q: dtype %s is not a float type", name, info.DType)
			}
			vals, err := f.ReadFloat32(name)
			if err != nil {
				return nil, nil, err
			}
			saved = append(saved, PEFTSaved{Module: k.module, Param: k.param, Key: name, DType: info.DType, Shape: append([]int(nil), info.Shape...), Values: vals})
			continue
		}
		p := byModule[k.module]
		if p == nil {
			p = &modulePair{key: k}
			byModule[k.module] = p
		}
		if p.key.prefix != k.prefix || p.key.adapter != k.adapter {
			return nil, nil, fmt.Errorf("module %q appears under different prefixes or adapter names (%q and %q)", k.module, p.firstKey(), name)
		}
		if p.key.embedding != k.embedding {
			return nil, nil, fmt.Errorf("module %q has both Linear (lora_A/lora_B) and Embedding (lora_embedding_A/B) keys (%q and %q)", k.module, p.firstKey(), name)
		}
		info, _ := f.Tensor(name)
		if k.isM {
			if p.keyM != "" {
				return nil, nil, fmt.Errorf("module %q has two DoRA magnitude vectors", k.module)
			}
			p.keyM, p.infoM = name, info
			continue
		}
		if k.isB {
			if p.keyB != "" {
				return nil, nil, fmt.Errorf("module %q has two lora_B weights", k.module)
			}
			p.keyB, p.infoB = name, info
		} else {
			if p.keyA != "" {
				return nil, nil, fmt.Errorf("module %q has two lora_A weights", k.module)
			}
			p.keyA, p.infoA = name, info
		}
	}
	sort.Slice(saved, func(i, j int) bool {
		if saved[i].Module != saved[j].Module {
			return saved[i].Module < saved[j].Module
		}
		return saved[i].Param < saved[j].Param
	})
	if len(byModule) == 0 && len(saved) == 0 {
		return nil, nil, errors.New("no lora_A/lora_B weights found")
	}
	names := make([]string, 0, len(byModule))
	for n := range byModule {
		names = append(names, n)
	}
	sort.Strings(names)
	mods := make([]PEFTModule, 0, len(names))
	for _, n := range names {
		p := byModule[n]
		switch {
		case p.keyA == "":
			return nil, nil, fmt.Errorf("module %q has lora_B (%q) but no lora_A", n, p.keyB)
		case p.keyB == "":
			return nil, nil, fmt.Errorf("module %q has lora_A (%q) but no lora_B", n, p.keyA)
		}
		a, b := p.infoA, p.infoB
		var kernel []int
		if len(a.Shape) >= 3 && len(a.Shape) <= 5 && len(b.Shape) == len(a.Shape) {
			// Conv LoRA: A [r, in, k…], B [out, r, 1…].
			kernel = append([]int(nil), a.Shape[2:]...)
			for _, d := range b.Shape[2:] {
				if d != 1 {
					return nil, nil, fmt.Errorf("module %q: Conv lora_B %v must be a 1x1 kernel [out, r, 1…]", n, b.Shape)
				}
			}
		} else if len(a.Shape) != 2 || len(b.Shape) != 2 {
			return nil, nil, fmt.Errorf("module %q: lora_A shape %v and lora_B shape %v must both be 2-D (Linear) or kernels of one rank (Conv)", n, a.Shape, b.Shape)
		}
		if p.keyM == "" && cfg.UseDoRA && !p.key.embedding {
			return nil, nil, fmt.Errorf("module %q has no lora_magnitude_vector, but use_dora is true", n)
		}
		if p.keyM != "" && !cfg.UseDoRA {
			return nil, nil, fmt.Errorf("module %q has a DoRA magnitude vector (%q) but use_dora is false", n, p.keyM)
		}
		if a.DType != b.DType {
			return nil, nil, fmt.Errorf("module %q: lora_A is %s but lora_B is %s", n, a.DType, b.DType)
		}
		if !a.DType.IsFloat() {
			return nil, nil, fmt.Errorf("module %q: dtype %s is not a float type (F16, BF16, F32, F64)", n, a.DType)
		}
		if a.Shape[0] != b.Shape[1] {
			return nil, nil, fmt.Errorf("module %q: rank mismatch, lora_A %v has %d rows but lora_B %v has %d columns", n, a.Shape, a.Shape[0], b.Shape, b.Shape[1])
		}
		rank, err := cfg.ModuleRank(n)
		if err != nil {
			return nil, nil, err
		}
		if a.Shape[0] != rank {
			return nil, nil, fmt.Errorf("module %q: weights have rank %d but the config gives rank %d (r or rank_pattern)", n, a.Shape[0], rank)
		}
		if a.Shape[1] == 0 || b.Shape[0] == 0 {
			return nil, nil, fmt.Errorf("module %q: empty weights, lora_A %v, lora_B %v", n, a.Shape, b.Shape)
		}
		alpha, err := cfg.ModuleAlpha(n)
		if err != nil {
			return nil, nil, err
		}
		var av, bv []float32
		if !lazy {
			if av, err = f.ReadFloat32(p.keyA); err != nil {
				return nil, nil, err
			}
			if bv, err = f.ReadFloat32(p.keyB); err != nil {
				return nil, nil, err
			}
		}
		mod := PEFTModule{
			Name: n, Prefix: p.key.prefix, AdapterName: p.key.adapter,
			KeyA: p.keyA, KeyB: p.keyB, DType: a.DType,
			Rank: rank, InFeatures: a.Shape[1], OutFeatures: b.Shape[0],
			Alpha: alpha, Scaling: cfg.Scaling(alpha, rank),
			A: av, B: bv, Embedding: p.key.embedding, Kernel: kernel,
		}
		if p.keyM != "" {
			if p.key.embedding {
				return nil, nil, fmt.Errorf("%w: DoRA on an Embedding layer (key %q)", ErrUnsupported, p.keyM)
			}
			if !p.infoM.DType.IsFloat() || p.infoM.NumElements() != mod.OutFeatures || !slices.Equal(p.infoM.Shape, mod.ShapeM()) && !slices.Equal(p.infoM.Shape, []int{mod.OutFeatures}) {
				return nil, nil, fmt.Errorf("module %q: DoRA magnitude %q is %s %v; %v floats are needed", n, p.keyM, p.infoM.DType, p.infoM.Shape, mod.ShapeM())
			}
			if mod.Magnitude, err = f.ReadFloat32(p.keyM); err != nil {
				return nil, nil, err
			}
			mod.KeyM = p.keyM
		}
		mods = append(mods, mod)
	}
	return mods, saved, nil
}
