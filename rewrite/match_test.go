package rewrite

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// selLlamaCands are the module paths of the corpus' llama-tiny model (two
// layers, a graph-output lm_head).
func selLlamaCands() []Candidate {
	var c []Candidate
	for l := 0; l < 2; l++ {
		for _, m := range []string{"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} {
			c = append(c, Candidate{Module: fmt.Sprintf("model.layers.%d.%s", l, m)})
		}
	}
	return append(c, Candidate{Module: "lm_head", OutputHead: true})
}

// selMixedCands mixes path styles from other corpus models: whisper's rootless
// layer, GPT-2's "h", BERT's "layer", an MoE expert and an unnamed-node model.
func selMixedCands() []Candidate {
	return []Candidate{
		{Module: "layers.0.fc1"},                              // 0 rooted at the container
		{Module: "transformer.h.3.mlp.c_fc"},                  // 1
		{Module: "bert.encoder.layer.1.attention.self.query"}, // 2
		{Module: "model.layers.2.experts.5.w1"},               // 3 MoE: layer 2, expert 5
		{Module: "l0.q.w"},                                    // 4 no layer index
		{Module: "fc1"},                                       // 5 no layer index
	}
}

func selectedModules(sel []Selection) []string {
	var out []string
	for _, s := range sel {
		out = append(out, s.Module)
	}
	return out
}

func TestSelectTargets(t *testing.T) {
	base := SelectOptions{Rank: 8, Alpha: 16}
	with := func(f func(o *SelectOptions)) SelectOptions {
		o := base
		f(&o)
		return o
	}
	tests := []struct {
		name  string
		cands []Candidate
		opts  SelectOptions
		want  []string
	}{
		{"names match a dotted suffix", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{"q_proj", "v_proj"} }),
			[]string{"model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj", "model.layers.1.attn.q_proj", "model.layers.1.attn.v_proj"}},
		{"multi-segment name", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{"attn.o_proj"} }),
			[]string{"model.layers.0.attn.o_proj", "model.layers.1.attn.o_proj"}},
		{"whole path", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{"model.layers.1.mlp.up_proj"} }),
			[]string{"model.layers.1.mlp.up_proj"}},
		{"blank and spaced entries", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{" ", " down_proj "} }),
			[]string{"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}},
		{"all-linear skips the output head", selLlamaCands()[5:], with(func(o *SelectOptions) { o.Targets = []string{"All-Linear"} }),
			[]string{"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.attn.q_proj", "model.layers.1.attn.k_proj",
				"model.layers.1.attn.v_proj", "model.layers.1.attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}},
		{"naming the head selects it", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{"lm_head"} }),
			[]string{"lm_head"}},
		{"all-linear plus the head", selLlamaCands()[12:], with(func(o *SelectOptions) { o.Targets = []string{AllLinear, "lm_head"} }),
			[]string{"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head"}},
		{"regex is a full match", selLlamaCands(), with(func(o *SelectOptions) { o.TargetRegex = `.*layers\.1\.attn\.(q|k)_proj` }),
			[]string{"model.layers.1.attn.q_proj", "model.layers.1.attn.k_proj"}},
		{"regex adds to names", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"gate_proj"}
			o.TargetRegex = `model\.layers\.0\.attn\.q_proj`
		}), []string{"model.layers.0.attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"}},
		{"exclude wins by name suffix", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{AllLinear}
			o.Exclude = []string{"mlp.gate_proj", "mlp.up_proj", "down_proj", "model.layers.0.attn.q_proj"}
		}), []string{"model.layers.0.attn.k_proj", "model.layers.0.attn.v_proj", "model.layers.0.attn.o_proj",
			"model.layers.1.attn.q_proj", "model.layers.1.attn.k_proj", "model.layers.1.attn.v_proj", "model.layers.1.attn.o_proj"}},
		{"exclude regex is a full match", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"q_proj", "k_proj"}
			o.ExcludeRegex = `.*\.layers\.0\..*`
		}), []string{"model.layers.1.attn.q_proj", "model.layers.1.attn.k_proj"}},
		{"exclude regex not a search", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"q_proj"}
			o.ExcludeRegex = `layers\.0`
		}), []string{"model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"}},
		{"layers filter name targets", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"q_proj", "down_proj"}
			o.Layers = []int{1}
		}), []string{"model.layers.1.attn.q_proj", "model.layers.1.mlp.down_proj"}},
		{"a whole path ignores layers, as in PEFT", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"model.layers.0.attn.q_proj", "v_proj"}
			o.Layers = []int{1}
		}), []string{"model.layers.0.attn.q_proj", "model.layers.1.attn.v_proj"}},
		{"layer index at the path start, any container", selMixedCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"fc1", "c_fc", "query", "w1", "q.w"}
			o.Layers = []int{0, 1, 3}
		}), []string{"layers.0.fc1", "transformer.h.3.mlp.c_fc", "bert.encoder.layer.1.attention.self.query", "fc1"}}, // "fc1" is a whole path
		{"MoE: the layer, not the expert", selMixedCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"w1"}
			o.Layers = []int{2}
		}), []string{"model.layers.2.experts.5.w1"}},
		{"layers pattern names the container", selMixedCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"w1"}
			o.Layers = []int{5}
			o.LayersPattern = []string{"experts"}
		}), []string{"model.layers.2.experts.5.w1"}},
		{"layers pattern tried in order", selMixedCands(), with(func(o *SelectOptions) {
			o.Targets = []string{"c_fc", "query", "0.fc1"} // "layers" is not "layer"
			o.Layers = []int{1, 3}
			o.LayersPattern = []string{"h", "layer"}
		}), []string{"transformer.h.3.mlp.c_fc", "bert.encoder.layer.1.attention.self.query"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sel, err := Select(tc.cands, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if got := selectedModules(sel); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("selected %q\nwant %q", got, tc.want)
			}
			for _, s := range sel {
				if tc.cands[s.Index].Module != s.Module {
					t.Errorf("selection %+v: index points at %q", s, tc.cands[s.Index].Module)
				}
			}
		})
	}
}

func TestSelectRankAlpha(t *testing.T) {
	cands := selLlamaCands()
	opts := SelectOptions{
		Targets: []string{AllLinear},
		Rank:    8,
		Alpha:   16,
		RankPattern: []PatternEntry{
			{Key: `layers\.0\.attn\.q_proj`, Value: 32}, // first: wins over "q_proj" below for layer 0
			{Key: "q_proj", Value: 4},
			{Key: "o_proj|up_proj", Value: 2}, // grouped: alternation stays inside the suffix
			{Key: "proj", Value: 99},          // not a dotted suffix of any path
		},
		AlphaPattern: []PatternEntry{
			{Key: `mlp\..*`, Value: 1.5},
			{Key: "down_proj", Value: 7}, // after mlp\..*: never used
		},
	}
	sel, err := Select(cands, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][2]float64{
		"model.layers.0.attn.q_proj":   {32, 16},
		"model.layers.1.attn.q_proj":   {4, 16},
		"model.layers.0.attn.k_proj":   {8, 16},
		"model.layers.1.attn.o_proj":   {2, 16},
		"model.layers.0.mlp.up_proj":   {2, 1.5},
		"model.layers.1.mlp.down_proj": {8, 1.5},
		"model.layers.0.mlp.gate_proj": {8, 1.5},
	}
	got := map[string][2]float64{}
	for _, s := range sel {
		got[s.Module] = [2]float64{float64(s.Rank), s.Alpha}
	}
	for m, w := range want {
		if got[m] != w {
			t.Errorf("%s: rank, alpha = %v, want %v", m, got[m], w)
		}
	}
	if len(sel) != 14 {
		t.Errorf("selected %d modules, want 14 (all but lm_head)", len(sel))
	}
}

func TestPatternKeyMatchesLikePEFT(t *testing.T) {
	// re.match(rf"(.*\.)?({key})$", path) in PEFT's get_pattern_key.
	tests := []struct {
		key, path string
		want      bool
	}{
		{"q_proj", "model.layers.0.self_attn.q_proj", true},
		{"q_proj", "q_proj", true},
		{"proj", "model.layers.0.self_attn.q_proj", false},
		{"self_attn.q_proj", "model.layers.0.self_attn.q_proj", true},
		{`layers\.1\..*`, "model.layers.1.mlp.up_proj", true},
		{`layers\.1\..*`, "model.layers.10.mlp.up_proj", false},
		{"q_proj|v_proj", "model.v_proj", true},
		{"q_proj|v_proj", "model.v_proj.x", false},
		{"q_proj|v_proj", "model.xv_proj", false},
		{"model", "model.layers.0.q_proj", false},
	}
	for _, tc := range tests {
		re, err := compilePatternKey(tc.key)
		if err != nil {
			t.Fatal(err)
		}
		if got := re.MatchString(tc.path); got != tc.want {
			t.Errorf("key %q on %q: %v, want %v", tc.key, tc.path, got, tc.want)
		}
	}
}

func TestLayerIndex(t *testing.T) {
	tests := []struct {
		path     string
		patterns []string
		want     int
		ok       bool
	}{
		{"model.layers.12.self_attn.q_proj", nil, 12, true},
		{"layers.0.fc1", nil, 0, true},
		{"transformer.h.3.mlp.c_fc", nil, 3, true},
		{"model.layers.2.experts.5.w1", nil, 2, true},
		{"model.layers.2.experts.5.w1", []string{"experts"}, 5, true},
		{"model.layers.2.experts.5.w1", []string{"blocks", "layers"}, 2, true},
		{"transformer.h.3.mlp.c_fc", []string{"layers"}, 0, false},
		{"lm_head", nil, 0, false},
		{"l0.q.w", nil, 0, false},
		{"model.layers.3", nil, 0, false}, // the index must be followed by a submodule
		{"model.layers.99999999999999999999.q", nil, 0, false},
	}
	for _, tc := range tests {
		s, err := NewSelector(SelectOptions{Targets: []string{"x"}, Layers: []int{0}, LayersPattern: tc.patterns, Rank: 1, Alpha: 1})
		if err != nil {
			t.Fatal(err)
		}
		got, ok := s.layerIndex(tc.path)
		if got != tc.want || ok != tc.ok {
			t.Errorf("layerIndex(%q, %q) = %d, %v; want %d, %v", tc.path, tc.patterns, got, ok, tc.want, tc.ok)
		}
	}
}

func TestSelectErrors(t *testing.T) {
	ok := SelectOptions{Targets: []string{"q_proj"}, Rank: 8, Alpha: 16}
	with := func(f func(o *SelectOptions)) SelectOptions {
		o := ok
		f(&o)
		return o
	}
	many := make([]Candidate, 30)
	for i := range many {
		many[i] = Candidate{Module: fmt.Sprintf("m.layers.%d.fc", i)}
	}
	tests := []struct {
		name    string
		cands   []Candidate
		opts    SelectOptions
		want    []string // substrings of the error
		notWant []string
	}{
		{"rank zero", selLlamaCands(), with(func(o *SelectOptions) { o.Rank = 0 }), []string{"rank must be a positive integer, got 0"}, nil},
		{"rank negative", selLlamaCands(), with(func(o *SelectOptions) { o.Rank = -4 }), []string{"got -4"}, nil},
		{"alpha zero", selLlamaCands(), with(func(o *SelectOptions) { o.Alpha = 0 }), []string{"alpha must be"}, nil},
		{"no targets", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{" "} }), []string{"no target modules given"}, nil},
		{"bad target regex", selLlamaCands(), with(func(o *SelectOptions) { o.TargetRegex = `(?!lm_head).*` }), []string{"target regex", "invalid regex", "RE2"}, nil},
		{"bad exclude regex", selLlamaCands(), with(func(o *SelectOptions) { o.ExcludeRegex = `(a)\1` }), []string{"exclude regex", "RE2"}, nil},
		{"layers with regex", selLlamaCands(), with(func(o *SelectOptions) {
			o.TargetRegex = ".*"
			o.Layers = []int{0}
		}), []string{"layers cannot be combined"}, nil},
		{"layers with all-linear", selLlamaCands(), with(func(o *SelectOptions) {
			o.Targets = []string{AllLinear}
			o.Layers = []int{0}
		}), []string{"layers cannot be combined"}, nil},
		{"layers pattern alone", selLlamaCands(), with(func(o *SelectOptions) { o.LayersPattern = []string{"layers"} }), []string{"layers pattern needs layer indices"}, nil},
		{"bad layers pattern", selLlamaCands(), with(func(o *SelectOptions) {
			o.Layers = []int{0}
			o.LayersPattern = []string{"("}
		}), []string{"layers pattern", "RE2"}, nil},
		{"negative layer", selLlamaCands(), with(func(o *SelectOptions) { o.Layers = []int{-1} }), []string{"layer index -1"}, nil},
		{"fractional rank pattern", selLlamaCands(), with(func(o *SelectOptions) { o.RankPattern = []PatternEntry{{"q_proj", 2.5}} }), []string{"rank pattern", "2.5"}, nil},
		{"bad rank pattern regex", selLlamaCands(), with(func(o *SelectOptions) { o.RankPattern = []PatternEntry{{"[", 2}} }), []string{"rank pattern", "invalid regex"}, nil},
		{"no candidates", nil, ok, []string{"no layer to adapt"}, nil},
		{"nothing matched lists modules", selLlamaCands(), with(func(o *SelectOptions) { o.Targets = []string{"query", "value"} }),
			[]string{`no module matched target modules ["query" "value"]`, "15 module(s)", "model.layers.0.attn.q_proj", "lm_head"}, []string{"more"}},
		{"long list is cut", many, with(func(o *SelectOptions) { o.Targets = []string{"q_proj"} }),
			[]string{"30 module(s)", "m.layers.19.fc", "and 10 more"}, []string{"m.layers.20.fc"}},
		{"all excluded says so", selLlamaCands(), with(func(o *SelectOptions) { o.Exclude = []string{"attn.q_proj"} }),
			[]string{"2 matched but were excluded"}, nil},
		{"wrong layers says so", selLlamaCands(), with(func(o *SelectOptions) { o.Layers = []int{5} }),
			[]string{"in layers [5]", "2 matched in layers other than [5]"}, nil},
		{"head only skipped says so", selLlamaCands()[14:], with(func(o *SelectOptions) { o.Targets = []string{AllLinear} }),
			[]string{"1 output head(s) are skipped by all-linear"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sel, err := Select(tc.cands, tc.opts)
			if err == nil {
				t.Fatalf("no error; selected %q", selectedModules(sel))
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			for _, w := range tc.notWant {
				if strings.Contains(err.Error(), w) {
					t.Errorf("error %q contains %q", err, w)
				}
			}
		})
	}
}

func TestParsePatterns(t *testing.T) {
	got, err := ParsePatterns([]string{
		`model\.layers\.0\..*=16`,
		" q_proj = 4 ",
		`x{1,3}=2`,   // a comma inside one pattern
		"q_proj=8",   // repeated key: last value, first position
		`a=b=0.5`,    // split at the last '='
		"v_proj=1e1", // any float syntax
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []PatternEntry{{`model\.layers\.0\..*`, 16}, {"q_proj", 8}, {`x{1,3}`, 2}, {"a=b", 0.5}, {"v_proj", 10}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ParsePatterns = %+v\nwant %+v", got, want)
	}
	for _, bad := range []string{"q_proj", "=4", "q_proj=", "q_proj=four", "q_proj=NaN", "q_proj=Inf", "(?=x)=2"} {
		if _, err := ParsePatterns([]string{bad}); err == nil {
			t.Errorf("ParsePatterns(%q): no error", bad)
		}
	}
	if got, err := ParsePatterns(nil); err != nil || len(got) != 0 {
		t.Errorf("ParsePatterns(nil) = %v, %v", got, err)
	}
}

func TestUnmatched(t *testing.T) {
	s, err := NewSelector(SelectOptions{Targets: []string{"q_proj", "vproj", AllLinear, "lm_head", "proj"}, Rank: 1, Alpha: 1})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.Unmatched(selLlamaCands()), []string{"vproj", "proj"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Unmatched = %q, want %q", got, want)
	}
}

func TestMatchesAndRankAlpha(t *testing.T) {
	s, err := NewSelector(SelectOptions{Targets: []string{"fc1"}, Rank: 4, Alpha: 8,
		RankPattern: []PatternEntry{{"fc1", 2}}})
	if err != nil {
		t.Fatal(err)
	}
	if !s.Matches(Candidate{Module: "fc1"}) || s.Matches(Candidate{Module: "fc2"}) || s.Matches(Candidate{Module: "xfc1"}) {
		t.Error("Matches disagrees with PEFT's name rule")
	}
	if r, a := s.RankAlpha("fc1"); r != 2 || a != 8 {
		t.Errorf("RankAlpha(fc1) = %d, %v; want 2, 8", r, a)
	}
	if r, a := s.RankAlpha("fc2"); r != 4 || a != 8 {
		t.Errorf("RankAlpha(fc2) = %d, %v; want 4, 8", r, a)
	}
}
