package main

import (
	"io"

	"github.com/spf13/pflag"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/inspect"
	"github.com/onnxlora/onnxlora/rewrite"
)

// adapterDirFlags are inspect's --adapter dry-run flags.
type adapterDirFlags struct {
	Dir     string
	Maps    []string
	MapFile string
	Preset  string
}

func (f *adapterDirFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.Dir, "adapter", "", "a PEFT adapter directory: show which key goes to which layer, as merge --adapter would (a dry run)")
	fl.StringArrayVar(&f.Maps, "map", nil, "with --adapter: rename PEFT module paths, `FROM=TO`, as merge --map does")
	fl.StringVar(&f.MapFile, "map-file", "", "with --adapter: module map rules from a JSON or YAML file, as merge --map-file")
	fl.StringVar(&f.Preset, "preset", "auto", "with --adapter: exporter naming preset (auto, none, "+presetNames()+")")
}

// runInspectAdapterDir prints the mapping of a PEFT adapter onto the model.
func runInspectAdapterDir(opts *InspectOptions, m *graph.Model) error {
	mo := &MergeOptions{Maps: opts.Adapter.Maps, MapFile: opts.Adapter.MapFile}
	rules, err := mo.mapRules()
	if err != nil {
		return err
	}
	r, err := inspect.BuildAdapterDir(m, opts.Model, opts.Adapter.Dir, rewrite.MergeOptions{Map: rules, Preset: opts.Adapter.Preset})
	if err != nil {
		return err
	}
	write := func(w io.Writer) error { return inspect.WriteAdapterDirText(w, r) }
	if opts.JSON {
		write = func(w io.Writer) error { return inspect.WriteAdapterDirJSON(w, r) }
	}
	return openOutput(opts.IO, opts.Output, write)
}
