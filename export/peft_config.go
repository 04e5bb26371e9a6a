package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
)

// PEFTConfig is a LoRA adapter_config.json. Fields without a Go counterpart
// are kept in Extra and written back unchanged.
type PEFTConfig struct {
	PEFTType            string  // peft_type; must be "LORA"
	TaskType            string  // task_type, e.g. "CAUSAL_LM"; "" is null
	BaseModelNameOrPath string  // base_model_name_or_path; "" is null
	R                   int     // r, the default rank
	LoraAlpha           float64 // lora_alpha, the default alpha
	LoraDropout         float64 // lora_dropout (training only)
	UseRSLoRA           bool    // use_rslora: scaling alpha/sqrt(r) instead of alpha/r
	UseDoRA             bool    // use_dora: modules carry lora_magnitude_vector
	FanInFanOut         bool    // fan_in_fan_out: the base weight is stored [in, out] (GPT-2 Conv1D)
	InferenceMode       bool    // inference_mode
	Bias                string  // bias: "none", "all" or "lora_only"
	TargetModules       TargetModules
	// RankPattern and AlphaPattern keep the file's key order because PEFT
	// uses the first key that matches.
	RankPattern       []Pattern[int]
	AlphaPattern      []Pattern[float64]
	ModulesToSave     []string    // modules_to_save; nil is null
	LayersToTransform []int       // layers_to_transform; nil is null
	InitLoraWeights   InitWeights // init_lora_weights
	// Extra holds every other key with its raw JSON value.
	Extra map[string]json.RawMessage
}

// Pattern is one rank_pattern or alpha_pattern entry: a Python regular
// expression matched against module names, and the value it selects.
type Pattern[V int | float64] struct {
	Key   string
	Value V
}

// TargetModules is target_modules: either a list of module names (a module
// matches an entry equal to its name or to a dot-separated suffix of it) or
// a single regular expression that must match the whole module name.
type TargetModules struct {
	Names   []string // list form
	Regex   string   // string form, used when IsRegex; "all-linear" is a PEFT shorthand
	IsRegex bool
}

// InitWeights is init_lora_weights: "true", "false", or a method name such
// as "gaussian", "pissa" or "loftq" ("" means PEFT's default, true).
type InitWeights string

// NewPEFTConfig returns a LoRA config with PEFT's defaults and the given
// rank, alpha and target module names.
func NewPEFTConfig(r int, alpha float64, targets ...string) *PEFTConfig {
	return &PEFTConfig{
		PEFTType:        "LORA",
		R:               r,
		LoraAlpha:       alpha,
		Bias:            "none",
		InferenceMode:   true,
		TargetModules:   TargetModules{Names: append([]string(nil), targets...)},
		InitLoraWeights: "true",
	}
}

// PatternKey mirrors PEFT's get_pattern_key: the first key (in order) for
// which re.match(rf"(.*\.)?({key})$", name) succeeds. Keys are Python
// regular expressions; one that Go's RE2 cannot compile is an error.
func PatternKey(keys []string, name string) (string, bool, error) {
	for _, k := range keys {
		re, err := compilePatternKey(k)
		if err != nil {
			return "", false, err
		}
		if re.MatchString(name) {
			return k, true, nil
		}
	}
	return "", false, nil
}

func compilePatternKey(key string) (*regexp.Regexp, error) {
	// Same text as PEFT's f-string, anchored at the start because re.match is.
	re, err := regexp.Compile(`^(.*\.)?(` + key + `)$`)
	if err != nil {
		return nil, fmt.Errorf("pattern key %q is not a regular expression Go can evaluate: %v", key, err)
	}
	return re, nil
}

// ModuleRank returns the rank PEFT gives module name: the first matching
// rank_pattern value, else r.
func (c *PEFTConfig) ModuleRank(name string) (int, error) {
	keys := make([]string, len(c.RankPattern))
	for i, p := range c.RankPattern {
		keys[i] = p.Key
	}
	k, ok, err := PatternKey(keys, name)
	if err != nil || !ok {
		return c.R, err
	}
	for _, p := range c.RankPattern {
		if p.Key == k {
			return p.Value, nil
		}
	}
	return c.R, nil
}

// ModuleAlpha returns the alpha PEFT gives module name: the first matching
// alpha_pattern value, else lora_alpha.
func (c *PEFTConfig) ModuleAlpha(name string) (float64, error) {
	keys := make([]string, len(c.AlphaPattern))
	for i, p := range c.AlphaPattern {
		keys[i] = p.Key
	}
	k, ok, err := PatternKey(keys, name)
	if err != nil || !ok {
		return c.LoraAlpha, err
	}
	for _, p := range c.AlphaPattern {
		if p.Key == k {
			return p.Value, nil
		}
	}
	return c.LoraAlpha, nil
}

// Scaling returns the LoRA scaling for the given alpha and rank under this
// config: alpha/sqrt(rank) with use_rslora, else alpha/rank.
func (c *PEFTConfig) Scaling(alpha float64, rank int) float64 {
	if c.UseRSLoRA {
		return alpha / math.Sqrt(float64(rank))
	}
	return alpha / float64(rank)
}

// baseAlteringInits are init_lora_weights methods after which PEFT changes
// the base weights too (residual models), so the saved A/B are not a delta
// on the original model unless converted on save.
var baseAlteringInits = []string{"pissa", "olora", "corda", "loftq"}

// mustBeUnset lists config keys (kept in Extra) whose non-default value
// changes the adapter's arithmetic in ways this package does not model.
var mustBeUnset = map[string]string{
	"lora_bias":               "LoRA bias (lora_bias=true)",
	"use_qalora":              "QA-LoRA (use_qalora=true)",
	"layer_replication":       "layer replication (layer_replication)",
	"target_parameters":       "LoRA on parameters (target_parameters)",
	"trainable_token_indices": "trainable tokens (trainable_token_indices)",
	"alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}

// Validate checks that c describes a plain LoRA adapter this package can
// handle. Errors about unmodelled features wrap ErrUnsupported.
func (c *PEFTConfig) Validate() error {
	if c.PEFTType != "LORA" {
		return fmt.Errorf("peft_type is %q, only \"LORA\" is supported", c.PEFTType)
	}
	if c.R <= 0 {
		return fmt.Errorf("r is %d, must be positive", c.R)
	}
	if math.IsNaN(c.LoraAlpha) || math.IsInf(c.LoraAlpha, 0) {
		return fmt.Errorf("lora_alpha is %v", c.LoraAlpha)
	}
	switch c.Bias {
	case "", "none", "all", "lora_only":
	default:
		return fmt.Errorf("bias is %q, expected \"none\", \"all\" or \"lora_only\"", c.Bias)
	}
	initMethod := strings.ToLower(string(c.InitLoraWeights))
	for _, m := range baseAlteringInits {
		if strings.HasPrefix(initMethod, m) {
			return fmt.Errorf("%w: init_lora_weights=%q changes the base weights too; save the adapter with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA", ErrUnsupported, string(c.InitLoraWeights))
		}
	}
	keys := make([]string, 0, len(mustBeUnset))
	for k := range mustBeUnset {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		raw, ok := c.Extra[k]
		if !ok {
			continue
		}
		switch strings.TrimSpace(string(raw)) {
		case "null", "false", "[]", "{}", `""`:
			continue
		}
		return fmt.Errorf("%w: %s", ErrUnsupported, mustBeUnset[k])
	}
	for _, p := range c.RankPattern {
		if p.Value <= 0 {
			return fmt.Errorf("rank_pattern[%q] is %d, must be positive", p.Key, p.Value)
		}
		if _, err := compilePatternKey(p.Key); err != nil {
			return fmt.Errorf("rank_pattern: %v", err)
		}
	}
	for _, p := range c.AlphaPattern {
		if _, err := compilePatternKey(p.Key); err != nil {
			return fmt.Errorf("alpha_pattern: %v", err)
		}
	}
	return nil
}

// ReadPEFTConfig reads and validates an adapter_config.json file.
func ReadPEFTConfig(path string) (*PEFTConfig, error) {
	data, err := graph.ReadFile(path, 1<<26)
	if err != nil {
		return nil, fmt.Errorf("peft config %s: %v", path, unwrapPathError(err))
	}
	var c PEFTConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("peft config %s: %v", path, err)
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("peft config %s: %w", path, err)
	}
	return &c, nil
}

// matches reports whether PEFT would adapt module name under t. checkable
// is false when that cannot be decided here: the "all-linear" shorthand
// (depends on layer types) or a Python-only regular expression.
func (t TargetModules) matches(name string) (match, checkable bool) {
	if t.IsRegex {
		if t.Regex == "all-linear" {
			return false, false
		}
		re, err := regexp.Compile(`^(?:` + t.Regex + `)$`) // re.fullmatch
		if err != nil {
			return false, false
		}
		return re.MatchString(name), true
	}
	for _, n := range t.Names {
		if name == n || strings.HasSuffix(name, "."+n) {
			return true, true
		}
	}
	return false, true
}

func (t TargetModules) empty() bool { return !t.IsRegex && len(t.Names) == 0 }

// knownConfigKeys are the adapter_config.json keys with PEFTConfig fields.
var knownConfigKeys = map[string]bool{
	"peft_type": true, "task_type": true, "base_model_name_or_path": true,
	"r": true, "lora_alpha": true, "lora_dropout": true, "use_rslora": true,
	"use_dora": true, "fan_in_fan_out": true, "inference_mode": true,
	"bias": true, "target_modules": true, "rank_pattern": true,
	"alpha_pattern": true, "modules_to_save": true, "layers_to_transform": true,
	"init_lora_weights": true,
}

// MarshalJSON encodes the config as a JSON object with sorted keys (as PEFT
// writes it). Pattern maps keep their order; Extra keys are included unless
// a field of the same name exists.
func (c PEFTConfig) MarshalJSON() ([]byte, error) {
	out := make(map[string]json.RawMessage, len(c.Extra)+len(knownConfigKeys))
	for k, v := range c.Extra {
		if !knownConfigKeys[k] {
			out[k] = v
		}
	}
	set := func(k string, v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("%s: %v", k, err)
		}
		out[k] = b
		return nil
	}
	nullable := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	bias := c.Bias
	if bias == "" {
		bias = "none"
	}
	var target any
	switch {
	case c.TargetModules.IsRegex:
		target = c.TargetModules.Regex
	case c.TargetModules.Names != nil:
		target = c.TargetModules.Names
	}
	var layers any
	if c.LayersToTransform != nil {
		layers = c.LayersToTransform
	}
	var toSave any
	if c.ModulesToSave != nil {
		toSave = c.ModulesToSave
	}
	var initVal any
	switch c.InitLoraWeights {
	case "", "true":
		initVal = true
	case "false":
		initVal = false
	default:
		initVal = string(c.InitLoraWeights)
	}
	for _, kv := range []struct {
		k string
		v any
	}{
		{"peft_type", c.PEFTType}, {"task_type", nullable(c.TaskType)},
		{"base_model_name_or_path", nullable(c.BaseModelNameOrPath)},
		{"r", c.R}, {"lora_alpha", c.LoraAlpha}, {"lora_dropout", c.LoraDropout},
		{"use_rslora", c.UseRSLoRA}, {"use_dora", c.UseDoRA},
		{"fan_in_fan_out", c.FanInFanOut}, {"inference_mode", c.InferenceMode},
		{"bias", bias}, {"target_modules", target}, {"modules_to_save", toSave},
		{"layers_to_transform", layers}, {"init_lora_weights", initVal},
	} {
		if err := set(kv.k, kv.v); err != nil {
			return nil, err
		}
	}
	var err error
	if out["rank_pattern"], err = marshalPatterns(c.RankPattern); err != nil {
		return nil, err
	}
	if out["alpha_pattern"], err = marshalPatterns(c.AlphaPattern); err != nil {
		return nil, err
	}
	return json.Marshal(out)
}

func marshalPatterns[V int | float64](ps []Pattern[V]) (json.RawMessage, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, p := range ps {
		if i > 0 {
			b.WriteByte(',')
		}
		k, err := json.Marshal(p.Key)
		if err != nil {
			return nil, err
		}
		v, err := json.Marshal(p.Value)
		if err != nil {
			return nil, fmt.Errorf("pattern %q: %v", p.Key, err)
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

type rawEntry struct {
	key   string
	value json.RawMessage
}

// orderedObject splits a JSON object into its entries in file order,
// refusing duplicate keys (Python would silently keep the last one).
func orderedObject(data []byte) ([]rawEntry, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("expected a JSON object")
	}
	seen := map[string]bool{}
	var out []rawEntry
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, err
		}
		k := kt.(string)
		if seen[k] {
			return nil, fmt.Errorf("duplicate key %q", k)
		}
		seen[k] = true
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("%q: %v", k, err)
		}
		out = append(out, rawEntry{k, v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("unexpected data after the JSON object")
	}
	return out, nil
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func decodeInt(raw json.RawMessage) (int, error) {
	s := string(bytes.TrimSpace(raw))
	v, err := strconv.ParseInt(s, 10, 0)
	if err != nil {
		return 0, fmt.Errorf("%s is not an integer", s)
	}
	return int(v), nil
}

func decodeFloat(raw json.RawMessage) (float64, error) {
	var v float64
	// Unmarshal would accept null as 0.
	if err := json.Unmarshal(raw, &v); err != nil || isNull(raw) {
		return 0, fmt.Errorf("%s is not a number", bytes.TrimSpace(raw))
	}
	return v, nil
}

// decodeNullable unmarshals raw into v unless it is null (leaving v zero).
func decodeNullable(raw json.RawMessage, v any) error {
	if isNull(raw) {
		return nil
	}
	return json.Unmarshal(raw, v)
}

func decodePatterns[V int | float64](raw json.RawMessage, conv func(json.RawMessage) (V, error)) ([]Pattern[V], error) {
	if isNull(raw) {
		return nil, nil
	}
	entries, err := orderedObject(raw)
	if err != nil {
		return nil, err
	}
	out := make([]Pattern[V], 0, len(entries))
	for _, e := range entries {
		v, err := conv(e.value)
		if err != nil {
			return nil, fmt.Errorf("key %q: %v", e.key, err)
		}
		out = append(out, Pattern[V]{Key: e.key, Value: v})
	}
	return out, nil
}

// UnmarshalJSON decodes an adapter_config.json object. Absent keys take
// PEFT's LoraConfig defaults (r 8, lora_alpha 8, bias "none"); unknown keys
// go to Extra. It does not validate; see Validate.
func (c *PEFTConfig) UnmarshalJSON(data []byte) error {
	entries, err := orderedObject(data)
	if err != nil {
		return err
	}
	*c = PEFTConfig{R: 8, LoraAlpha: 8, Bias: "none", InitLoraWeights: "true"}
	for _, e := range entries {
		raw := e.value
		var err error
		switch e.key {
		case "peft_type":
			err = decodeNullable(raw, &c.PEFTType)
		case "task_type":
			err = decodeNullable(raw, &c.TaskType)
		case "base_model_name_or_path":
			err = decodeNullable(raw, &c.BaseModelNameOrPath)
		case "r":
			c.R, err = decodeInt(raw)
		case "lora_alpha":
			c.LoraAlpha, err = decodeFloat(raw)
		case "lora_dropout":
			err = decodeNullable(raw, &c.LoraDropout)
		case "use_rslora":
			err = decodeNullable(raw, &c.UseRSLoRA)
		case "use_dora":
			err = decodeNullable(raw, &c.UseDoRA)
		case "fan_in_fan_out":
			err = decodeNullable(raw, &c.FanInFanOut)
		case "inference_mode":
			err = decodeNullable(raw, &c.InferenceMode)
		case "bias":
			err = decodeNullable(raw, &c.Bias)
		case "target_modules":
			err = c.TargetModules.decode(raw)
		case "rank_pattern":
			c.RankPattern, err = decodePatterns(raw, decodeInt)
		case "alpha_pattern":
			c.AlphaPattern, err = decodePatterns(raw, decodeFloat)
		case "modules_to_save":
			err = decodeNullable(raw, &c.ModulesToSave)
		case "layers_to_transform":
			var one int
			if !isNull(raw) && json.Unmarshal(raw, &one) == nil {
				c.LayersToTransform = []int{one}
			} else {
				err = decodeNullable(raw, &c.LayersToTransform)
			}
		case "init_lora_weights":
			var b bool
			var s string
			switch {
			case isNull(raw):
				c.InitLoraWeights = ""
			case json.Unmarshal(raw, &b) == nil:
				c.InitLoraWeights = InitWeights(strconv.FormatBool(b))
			case json.Unmarshal(raw, &s) == nil:
				c.InitLoraWeights = InitWeights(s)
			default:
				err = errors.New("must be a boolean or a string")
			}
		default:
			if c.Extra == nil {
				c.Extra = map[string]json.RawMessage{}
			}
			c.Extra[e.key] = append(json.RawMessage(nil), raw...)
		}
		if err != nil {
			return fmt.Errorf("%s: %v", e.key, err)
		}
	}
	return nil
}

func (t *TargetModules) decode(raw json.RawMessage) error {
	*t = TargetModules{}
	if isNull(raw) {
		return nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		t.Regex, t.IsRegex = s, true
		return nil
	}
	if err := json.Unmarshal(raw, &t.Names); err != nil {
		return errors.New("must be a list of strings or a string")
	}
	if t.Names == nil {
		t.Names = []string{}
	}
	return nil
}
