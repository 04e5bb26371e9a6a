package rewrite

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
)

// MapRule renames PEFT module paths before they are matched to the ONNX
// model's layers: every match of From in the path is replaced by To, in
// which $1 or ${1} (or Python's \1) stand for From's groups.
type MapRule struct {
	From string `json:"from"`
	To   string `json:"to"`
	re   *regexp.Regexp
}

// pyGroupRE finds Python-style group references (\1) in a replacement.
var pyGroupRE = regexp.MustCompile(`\\([0-9]+)`)

// NewMapRule compiles a rule; From is a Go RE2 regex searched anywhere in
// the path (anchor it with ^ and $ to match whole paths).
func NewMapRule(from, to string) (MapRule, error) {
	if from == "" {
		return MapRule{}, errors.New("module map: empty pattern before '='")
	}
	re, err := regexp.Compile(from)
	if err != nil {
		return MapRule{}, fmt.Errorf("module map %q: invalid regex: %v (%s)", from, err, regexNote)
	}
	to = pyGroupRE.ReplaceAllString(to, `$${$1}`)
	return MapRule{From: from, To: to, re: re}, nil
}

// ParseMapRules parses "FROM=TO" strings, split at the last "=" (module
// paths and replacements never contain one).
func ParseMapRules(list []string) ([]MapRule, error) {
	var out []MapRule
	for _, s := range list {
		i := strings.LastIndexByte(s, '=')
		if i < 0 {
			return nil, fmt.Errorf("module map %q: want FROM=TO", s)
		}
		r, err := NewMapRule(strings.TrimSpace(s[:i]), strings.TrimSpace(s[i+1:]))
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// ReadMapFile reads module map rules from a file: JSON, either an object
// {"FROM": "TO", ...} (applied in file order) or a list of {"from", "to"}
// objects; or YAML of the same two shapes in block style ("FROM: TO"
// lines, or "- from: X" / "  to: Y" items), with quoted or plain scalars.
func ReadMapFile(path string) ([]MapRule, error) {
	data, err := graph.ReadFile(path, 1<<26)
	if err != nil {
		return nil, fmt.Errorf("module map file: %v", err)
	}
	var pairs [][2]string
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		pairs, err = jsonMapPairs(trimmed)
	} else {
		pairs, err = yamlMapPairs(data)
	}
	if err != nil {
		return nil, fmt.Errorf("module map file %s: %v", path, err)
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("module map file %s: no rules", path)
	}
	out := make([]MapRule, 0, len(pairs))
	for _, p := range pairs {
		r, err := NewMapRule(p[0], p[1])
		if err != nil {
			return nil, fmt.Errorf("module map file %s: %v", path, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func jsonMapPairs(data []byte) ([][2]string, error) {
	if data[0] == '[' {
		var list []struct {
			From *string `json:"from"`
			To   *string `json:"to"`
		}
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&list); err != nil {
			return nil, err
		}
		var out [][2]string
		for i, e := range list {
			if e.From == nil || e.To == nil {
				return nil, fmt.Errorf("entry %d: want {\"from\": ..., \"to\": ...}", i)
			}
			out = append(out, [2]string{*e.From, *e.To})
		}
		return out, nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	var out [][2]string
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return nil, err
		}
		var v string
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("%q: the replacement must be a string", k)
		}
		out = append(out, [2]string{k.(string), v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("unexpected data after the JSON value")
	}
	return out, nil
}

// yamlMapPairs reads the block-style YAML subset ReadMapFile documents.
func yamlMapPairs(data []byte) ([][2]string, error) {
	var out [][2]string
	var item *[2]string
	have := [2]bool{}
	flush := func(line int) error {
		if item == nil {
			return nil
		}
		if !have[0] || !have[1] {
			return fmt.Errorf("line %d: a list item needs both from: and to:", line)
		}
		out = append(out, *item)
		item, have = nil, [2]bool{}
		return nil
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		t := strings.TrimSpace(line)
		if t == "" || strings.HasPrefix(t, "#") || t == "---" {
			continue
		}
		listItem := strings.HasPrefix(t, "- ")
		if listItem {
			if err := flush(n); err != nil {
				return nil, err
			}
			item = &[2]string{}
			t = strings.TrimSpace(t[2:])
		}
		k, v, err := yamlKeyValue(t)
		if err != nil {
			return nil, fmt.Errorf("line %d: %v", n, err)
		}
		switch {
		case item != nil && (k == "from" || k == "to") && (listItem || strings.HasPrefix(line, " ")):
			i := 0
			if k == "to" {
				i = 1
			}
			item[i], have[i] = v, true
		case item == nil:
			out = append(out, [2]string{k, v})
		default:
			return nil, fmt.Errorf("line %d: expected from: or to: in a list item", n)
		}
	}
	if err := flush(n); err != nil {
		return nil, err
	}
	return out, sc.Err()
}

// yamlKeyValue splits "key: value" with either side optionally quoted.
func yamlKeyValue(t string) (string, string, error) {
	k, rest, err := yamlScalar(t, true)
	if err != nil {
		return "", "", err
	}
	rest = strings.TrimSpace(rest)
	if !strings.HasPrefix(rest, ":") {
		return "", "", errors.New(`want "FROM: TO"`)
	}
	v, tail, err := yamlScalar(strings.TrimSpace(rest[1:]), false)
	if err != nil {
		return "", "", err
	}
	if tail = strings.TrimSpace(tail); tail != "" && !strings.HasPrefix(tail, "#") {
		return "", "", fmt.Errorf("unexpected %q after the value", tail)
	}
	return k, v, nil
}

// yamlScalar reads a quoted or plain scalar; a plain key ends at ": ".
func yamlScalar(t string, key bool) (string, string, error) {
	if t == "" {
		return "", "", nil
	}
	switch t[0] {
	case '\'':
		var b strings.Builder
		for i := 1; i < len(t); i++ {
			if t[i] == '\'' {
				if i+1 < len(t) && t[i+1] == '\'' {
					b.WriteByte('\'')
					i++
					continue
				}
				return b.String(), t[i+1:], nil
			}
			b.WriteByte(t[i])
		}
		return "", "", errors.New("unterminated single-quoted string")
	case '"':
		for i := 1; i < len(t); i++ {
			if t[i] == '\\' {
				i++
				continue
			}
			if t[i] == '"' {
				var s string
				if err := json.Unmarshal([]byte(t[:i+1]), &s); err != nil {
					return "", "", fmt.Errorf("bad double-quoted string: %v", err)
				}
				return s, t[i+1:], nil
			}
		}
		return "", "", errors.New("unterminated double-quoted string")
	}
	if key {
		i := strings.Index(t, ": ")
		if i < 0 && strings.HasSuffix(t, ":") {
			i = len(t) - 1
		}
		if i < 0 {
			return "", "", errors.New(`want "FROM: TO"`)
		}
		return strings.TrimSpace(t[:i]), t[i:], nil
	}
	if i := strings.Index(t, " #"); i >= 0 {
		return strings.TrimSpace(t[:i]), "", nil
	}
	return t, "", nil
}

// apply runs the rules over a module path in order, each on the result
// of the one before.
func applyMapRules(rules []MapRule, path string) string {
	for _, r := range rules {
		re := r.re
		if re == nil {
			re = regexp.MustCompile(r.From)
		}
		path = re.ReplaceAllString(path, r.To)
	}
	return path
}

// MapPreset is a built-in set of module map rules for one exporter's
// naming, chosen by the model's producer_name.
type MapPreset struct {
	// Name is what --preset takes.
	Name string
	// Producers are the producer_name values that select the preset.
	Producers []string
	// Rules turn HuggingFace (PEFT) module paths into the exporter's.
	Rules []MapRule
	// Note says what the exporter changes, for inspect.
	Note string
}

// MapPresets are the built-in presets, for the exporters in the test
// corpus. Only onnxruntime-genai renames modules; the others keep
// HuggingFace's paths (keras2onnx's TensorFlow scopes are already mapped
// by ModulePath), and are listed so that inspect can say so.
var MapPresets = []MapPreset{
	{
		Name:      "genai",
		Producers: []string{"onnxruntime-genai"},
		Rules:     []MapRule{mustMapRule(`(^|\.)self_attn\.`, `${1}attn.`)},
		Note:      "onnxruntime-genai's model builder names attention modules attn where HuggingFace has self_attn",
	},
	{
		Name:      "ort-transformers",
		Producers: []string{"onnxruntime.transformers"},
		Note:      "the ORT transformer optimizer keeps HuggingFace names; fused Attention weights cannot take an adapter",
	},
	{
		Name:      "olive",
		Producers: []string{"olive"},
		Note:      "Olive exports through torch.onnx or the GenAI builder; torch.onnx keeps HuggingFace names",
	},
	{
		Name:      "keras2onnx",
		Producers: []string{"keras2onnx", "tf2onnx"},
		Note:      "TensorFlow scopes are mapped to HuggingFace names the way transformers converts TF weights",
	},
}

func mustMapRule(from, to string) MapRule {
	r, err := NewMapRule(from, to)
	if err != nil {
		panic(err)
	}
	return r
}

// PresetFor returns the preset a producer_name selects, or nil.
func PresetFor(producer string) *MapPreset {
	for i := range MapPresets {
		for _, p := range MapPresets[i].Producers {
			if strings.EqualFold(p, producer) {
				return &MapPresets[i]
			}
		}
	}
	return nil
}

// PresetNamed returns the preset called name, or an error listing them.
func PresetNamed(name string) (*MapPreset, error) {
	var names []string
	for i := range MapPresets {
		if MapPresets[i].Name == name {
			return &MapPresets[i], nil
		}
		names = append(names, MapPresets[i].Name)
	}
	return nil, fmt.Errorf("unknown module map preset %q; the presets are auto, none, %s", name, strings.Join(names, ", "))
}
