package inspect

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// AdapterDirReport is a dry run of applying a PEFT adapter directory to a
// model: which key goes to which layer, with shapes. Its JSON form is the
// output of `onnxlora inspect MODEL --adapter DIR --json`.
type AdapterDirReport struct {
	SchemaVersion int    `json:"schema_version"`
	Model         string `json:"model"`
	Adapter       string `json:"adapter"`
	Producer      string `json:"producer,omitempty"`
	// Preset is the module map preset in use and what it does.
	Preset     string `json:"preset,omitempty"`
	PresetNote string `json:"preset_note,omitempty"`
	// Modules are the adapter's modules (LoRA, embedding LoRA,
	// modules_to_save), each with its layer or none.
	Modules []rewrite.PEFTAssignment `json:"modules"`
	// Unmatched and Problems count the modules without a layer and those
	// whose tensors do not fit their layer; ApplyPEFT refuses either
	// (unmatched ones unless AllowPartial).
	Unmatched int `json:"unmatched"`
	Problems  int `json:"problems"`
}

// BuildAdapterDir matches the adapter in dir against m, as merge --adapter
// would, without changing anything.
func BuildAdapterDir(m *graph.Model, modelPath, dir string, opts rewrite.MergeOptions) (*AdapterDirReport, error) {
	pm, err := rewrite.MatchPEFT(m, dir, opts)
	if err != nil {
		return nil, err
	}
	r := &AdapterDirReport{SchemaVersion: 1, Model: modelPath, Adapter: dir, Producer: pm.Producer,
		Preset: pm.Preset, PresetNote: pm.PresetNote, Modules: pm.Assignments}
	for _, a := range pm.Assignments {
		if a.Layer == "" {
			r.Unmatched++
		}
		if a.Problem != "" {
			r.Problems++
		}
	}
	return r, nil
}

// WriteAdapterDirJSON writes the report as indented JSON.
func WriteAdapterDirJSON(w io.Writer, r *AdapterDirReport) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteAdapterDirText writes the report as a table: one row per tensor key.
func WriteAdapterDirText(w io.Writer, r *AdapterDirReport) error {
	fmt.Fprintf(w, "Adapter:  %s\nModel:    %s", r.Adapter, r.Model)
	if r.Producer != "" {
		fmt.Fprintf(w, " (producer %s)", r.Producer)
	}
	fmt.Fprintln(w)
	if r.Preset != "" {
		fmt.Fprintf(w, "Preset:   %s: %s\n", r.Preset, r.PresetNote)
	}
	fmt.Fprintf(w, "\n%d module(s): %d matched, %d unmatched, %d that do not fit\n", len(r.Modules), len(r.Modules)-r.Unmatched, r.Unmatched, r.Problems)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  KEY\tSHAPE\tKIND\tLAYER\tOP\t[IN,OUT]\tNOTES")
	for _, a := range r.Modules {
		layer, op, shape := a.Layer, a.Op, ""
		if layer == "" {
			layer, op = "(none)", "-"
		} else {
			shape = fmt.Sprintf("[%d,%d]", a.LayerShape[0], a.LayerShape[1])
		}
		var notes []string
		if a.Mapped != a.Module {
			notes = append(notes, "mapped to "+a.Mapped)
		}
		if a.Kind != rewrite.KindModulesToSave {
			notes = append(notes, fmt.Sprintf("r=%d alpha=%g scaling=%.6g", a.Rank, a.Alpha, a.Scaling))
		}
		if a.Problem != "" {
			notes = append(notes, "DOES NOT FIT: "+a.Problem)
		}
		for i, k := range a.Keys {
			dims := make([]string, len(a.Shapes[i]))
			for j, d := range a.Shapes[i] {
				dims[j] = fmt.Sprint(d)
			}
			if i == 0 {
				fmt.Fprintf(tw, "  %s\t[%s]\t%s\t%s\t%s\t%s\t%s\n", k, strings.Join(dims, ","), a.Kind, layer, op, shape, strings.Join(notes, "; "))
			} else {
				fmt.Fprintf(tw, "  %s\t[%s]\t\t\t\t\t\n", k, strings.Join(dims, ","))
			}
		}
	}
	return tw.Flush()
}
