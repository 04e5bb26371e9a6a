package export

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
)

// WritePEFTAdapter writes dir/adapter_model.safetensors (keys
// "base_model.model.<Name>.lora_A.weight" [Rank, InFeatures] and
// ".lora_B.weight" [OutFeatures, Rank], in each module's float DType, F32 when
// unset) and dir/adapter_config.json, each atomically, so PEFT can load the
// result. Module Prefix, AdapterName and keys are ignored. Each module's rank
// (and Alpha, when non-zero) must equal what config resolves for it, and the
// module must be selected by target_modules; an empty target_modules is
// filled with the modules' last name segments. config is not modified.
func WritePEFTAdapter(dir string, config *PEFTConfig, modules []PEFTModule) error {
	return WritePEFTAdapterPrefix(dir, config, modules, PEFTKeyPrefix)
}

// WritePEFTAdapterPrefix is WritePEFTAdapter with another key prefix than
// "base_model.model." (PeftModel's), e.g. "" for keys that are bare module
// paths. A non-empty prefix must end with a dot.
func WritePEFTAdapterPrefix(dir string, config *PEFTConfig, modules []PEFTModule, prefix string) error {
	return WritePEFTAdapterSaved(dir, config, modules, nil, prefix)
}

// WritePEFTAdapterSaved is WritePEFTAdapterPrefix with modules_to_save
// tensors too, under the keys save_pretrained gives them:
// <prefix><Module>.<Param>, in their DType and Shape (the torch module's
// own layout). Each Module must be selected by config.ModulesToSave.
func WritePEFTAdapterSaved(dir string, config *PEFTConfig, modules []PEFTModule, saved []PEFTSaved, prefix string) error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("peft adapter %s: %w", dir, fmt.Errorf(format, args...))
	}
	if config == nil {
		return fail("nil config")
	}
	if prefix != "" && (!strings.HasSuffix(prefix, ".") || strings.HasPrefix(prefix, ".") || strings.Contains(prefix, "..")) {
		return fail("key prefix %q must be dotted segments ending in a dot, like %q", prefix, PEFTKeyPrefix)
	}
	cfg := *config
	if cfg.PEFTType == "" {
		cfg.PEFTType = "LORA"
	}
	if cfg.Bias == "" {
		cfg.Bias = "none"
	}
	if err := cfg.Validate(); err != nil {
		return fail("%w", err)
	}
	if len(modules) == 0 {
		return fail("no modules to write")
	}
	if cfg.TargetModules.empty() {
		set := map[string]bool{}
		for _, m := range modules {
			set[m.Name[strings.LastIndexByte(m.Name, '.')+1:]] = true
		}
		cfg.TargetModules = TargetModules{}
		for n := range set {
			cfg.TargetModules.Names = append(cfg.TargetModules.Names, n)
		}
		sort.Strings(cfg.TargetModules.Names)
	}
	seen := map[string]bool{}
	tensors := make([]TensorData, 0, 2*len(modules))
	for i := range modules {
		m := &modules[i]
		if m.Name == "" || strings.HasPrefix(m.Name, ".") || strings.HasSuffix(m.Name, ".") || strings.Contains(m.Name, "..") {
			return fail("module name %q is not a dotted module path", m.Name)
		}
		if seen[m.Name] {
			return fail("duplicate module %q", m.Name)
		}
		seen[m.Name] = true
		if m.Rank <= 0 || m.InFeatures <= 0 || m.OutFeatures <= 0 {
			return fail("module %q: rank %d, in %d, out %d must all be positive", m.Name, m.Rank, m.InFeatures, m.OutFeatures)
		}
		rank, err := cfg.ModuleRank(m.Name)
		if err != nil {
			return fail("%w", err)
		}
		if rank != m.Rank {
			return fail("module %q has rank %d but the config gives %d; set r or add a rank_pattern entry", m.Name, m.Rank, rank)
		}
		alpha, err := cfg.ModuleAlpha(m.Name)
		if err != nil {
			return fail("%w", err)
		}
		if m.Alpha != 0 && m.Alpha != alpha {
			return fail("module %q has alpha %v but the config gives %v; set lora_alpha or add an alpha_pattern entry", m.Name, m.Alpha, alpha)
		}
		if ok, checkable := cfg.TargetModules.matches(m.Name); checkable && !ok && len(cfg.LayersToTransform) == 0 {
			return fail("module %q is not selected by target_modules, so PEFT would not load its weights", m.Name)
		}
		dt := m.DType
		if dt == "" {
			dt = DTypeF32
		}
		ta, err := NewFloat32Tensor(prefix+m.Name+".lora_A.weight", dt, m.ShapeA(), m.A)
		if err != nil {
			return fail("module %q lora_A: %v", m.Name, err)
		}
		tb, err := NewFloat32Tensor(prefix+m.Name+".lora_B.weight", dt, m.ShapeB(), m.B)
		if err != nil {
			return fail("module %q lora_B: %v", m.Name, err)
		}
		tensors = append(tensors, ta, tb)
		if (m.Magnitude != nil) != cfg.UseDoRA {
			return fail("module %q: a DoRA magnitude vector goes with use_dora=true and only with it", m.Name)
		}
		if m.Magnitude != nil {
			tm, err := NewFloat32Tensor(prefix+m.Name+".lora_magnitude_vector", dt, m.ShapeM(), m.Magnitude)
			if err != nil {
				return fail("module %q lora_magnitude_vector: %v", m.Name, err)
			}
			tensors = append(tensors, tm)
		}
	}
	for i := range saved {
		t, err := savedTensor(&saved[i], &cfg, prefix, seen)
		if err != nil {
			return fail("%w", err)
		}
		tensors = append(tensors, t)
	}
	cfgJSON, err := cfg.MarshalJSON()
	if err != nil {
		return fail("%v", err)
	}
	var indented bytes.Buffer
	if err := json.Indent(&indented, cfgJSON, "", "  "); err != nil {
		return fail("%v", err)
	}
	// PEFT marks its safetensors files with format "pt"; transformers checks it.
	meta := map[string]string{"format": "pt"}
	if _, _, err := buildHeader(tensors, meta); err != nil {
		return fail("%s: %v", PEFTWeightsFile, err)
	}
	if err := os.MkdirAll(filepath.Dir(filepath.Clean(dir)), 0o755); err != nil {
		return fail("%v", unwrapPathError(err))
	}
	// The config and the weights change together: a reader never sees the
	// new config with the old weights.
	err = graph.WriteDirAtomic(dir, []graph.DirFile{
		{Name: PEFTWeightsFile, Write: func(w io.Writer) error { return WriteSafetensorsTo(w, tensors, meta) }},
		{Name: PEFTConfigFile, Write: func(w io.Writer) error { _, err := w.Write(indented.Bytes()); return err }},
	})
	if err != nil {
		return fmt.Errorf("peft adapter: %w", err)
	}
	return nil
}

// savedTensor checks one modules_to_save tensor against the config and
// the LoRA modules (seen) and makes its safetensors entry.
func savedTensor(sv *PEFTSaved, cfg *PEFTConfig, prefix string, seen map[string]bool) (TensorData, error) {
	if sv.Module == "" || strings.HasPrefix(sv.Module, ".") || strings.HasSuffix(sv.Module, ".") || strings.Contains(sv.Module, "..") {
		return TensorData{}, fmt.Errorf("modules_to_save module name %q is not a dotted module path", sv.Module)
	}
	if sv.Param != "weight" && sv.Param != "bias" {
		return TensorData{}, fmt.Errorf("modules_to_save %s: parameter %q is neither weight nor bias", sv.Module, sv.Param)
	}
	if seen[sv.Module] {
		return TensorData{}, fmt.Errorf("module %q has a LoRA adapter and modules_to_save weights", sv.Module)
	}
	listed := false
	for _, m := range cfg.ModulesToSave {
		listed = listed || m != "" && (sv.Module == m || strings.HasSuffix(sv.Module, "."+m))
	}
	if !listed {
		return TensorData{}, fmt.Errorf("modules_to_save %s is not named by the config's modules_to_save, so PEFT would not load it", sv.Module)
	}
	key := prefix + sv.Module + "." + sv.Param
	if seen[key] {
		return TensorData{}, fmt.Errorf("modules_to_save tensor %s appears twice", key)
	}
	seen[key] = true
	dt := sv.DType
	if dt == "" {
		dt = DTypeF32
	}
	t, err := NewFloat32Tensor(key, dt, sv.Shape, sv.Values)
	if err != nil {
		return TensorData{}, fmt.Errorf("modules_to_save %s: %v", key, err)
	}
	return t, nil
}
