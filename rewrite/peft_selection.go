package rewrite

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/onnxlora/onnxlora/export"
)

// checkPEFTSelection refuses an adapter whose keys PEFT would not load:
// a LoRA module not selected by the config, or a selection PEFT refuses.
func checkPEFTSelection(ad *export.PEFTAdapter) error {
	cfg := ad.Config
	so, checkable, err := peftSelectOptions(cfg)
	if err != nil {
		return err
	}
	if !checkable || len(ad.Modules) == 0 {
		return nil
	}
	sel, err := NewSelector(so)
	if err != nil {
		return fmt.Errorf("%s: %w", export.PEFTConfigFile, err)
	}
	var bad []string
	for _, mod := range ad.Modules {
		if !sel.Matches(Candidate{Module: mod.Name}) {
			bad = append(bad, mod.Name)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	what := describePEFTSelection(cfg)
	if len(bad) == len(ad.Modules) {
		return fmt.Errorf("none of its %d modules is selected by %s in %s, so PEFT would refuse the config (target modules not found), e.g. %s", len(bad), what, export.PEFTConfigFile, bad[0])
	}
	return fmt.Errorf("%d of its %d modules are not selected by %s in %s, so PEFT would not load their keys, e.g. %s", len(bad), len(ad.Modules), what, export.PEFTConfigFile, bad[0])
}

// peftSelectOptions turns the config's selection fields into a Selector's
// options. checkable is false when the selection cannot be evaluated on
// module paths alone: no target_modules (PEFT then uses a per-architecture
// default) or "all-linear" (depends on layer types).
func peftSelectOptions(cfg *export.PEFTConfig) (so SelectOptions, checkable bool, err error) {
	so = SelectOptions{Rank: 1, Alpha: 1, Layers: cfg.LayersToTransform}
	tm := cfg.TargetModules
	switch {
	case tm.IsRegex && strings.EqualFold(tm.Regex, AllLinear):
		return so, false, nil
	case tm.IsRegex:
		so.TargetRegex = tm.Regex
	case len(tm.Names) == 0:
		return so, false, nil
	default:
		so.Targets = tm.Names
	}
	if raw, ok := cfg.Extra["exclude_modules"]; ok {
		var s string
		var list []string
		switch {
		case string(raw) == "null":
		case json.Unmarshal(raw, &s) == nil:
			so.ExcludeRegex = s
		case json.Unmarshal(raw, &list) == nil:
			so.Exclude = list
		default:
			return so, false, fmt.Errorf("%s: exclude_modules must be a string or a list of strings", export.PEFTConfigFile)
		}
	}
	if raw, ok := cfg.Extra["layers_pattern"]; ok && len(so.Layers) > 0 {
		var s string
		var list []string
		switch {
		case string(raw) == "null":
		case json.Unmarshal(raw, &s) == nil:
			if s != "" {
				so.LayersPattern = []string{s}
			}
		case json.Unmarshal(raw, &list) == nil:
			so.LayersPattern = list
		default:
			return so, false, fmt.Errorf("%s: layers_pattern must be a string or a list of strings", export.PEFTConfigFile)
		}
	}
	if tm.IsRegex && len(so.Layers) > 0 {
		return so, false, fmt.Errorf("%s: layers_to_transform cannot be used with a string target_modules (PEFT refuses this config)", export.PEFTConfigFile)
	}
	return so, true, nil
}

// describePEFTSelection says what the config selects, for messages.
func describePEFTSelection(cfg *export.PEFTConfig) string {
	var s string
	if cfg.TargetModules.IsRegex {
		s = fmt.Sprintf("target_modules %q", cfg.TargetModules.Regex)
	} else {
		s = fmt.Sprintf("target_modules %q", cfg.TargetModules.Names)
	}
	if len(cfg.LayersToTransform) > 0 {
		s += fmt.Sprintf(" with layers_to_transform %v", cfg.LayersToTransform)
	}
	if raw, ok := cfg.Extra["exclude_modules"]; ok && string(raw) != "null" {
		s += " and exclude_modules " + string(raw)
	}
	return s
}
