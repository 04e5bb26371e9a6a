package main

import (
	"io"
	"strings"

	"github.com/onnxlora/onnxlora/export"
	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/inspect"
)

// isOnnxAdapterFile reports whether path names an ONNX Runtime adapter
// file: by its extension, or by the flatbuffers identifier "TORT" at bytes
// 4..8 (an ONNX model is protobuf and never has it there).
func isOnnxAdapterFile(path string) bool {
	if strings.HasSuffix(path, export.OnnxAdapterExt) {
		return true
	}
	f, err := graph.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var head [8]byte
	if _, err := io.ReadFull(f, head[:]); err != nil {
		return false
	}
	return string(head[4:]) == "TORT"
}

// runInspectAdapterFile is `onnxlora inspect X.onnx_adapter`: parameters,
// shapes, ranks and norms.
func runInspectAdapterFile(opts *InspectOptions) error {
	if opts.DOT || opts.selection != nil || opts.NoNorms {
		return usageErrorf("%s is an adapter file: --dot, --no-norms and selection flags apply to models only", opts.Model)
	}
	r, err := inspect.BuildAdapterFile(opts.Model)
	if err != nil {
		return err
	}
	write := func(w io.Writer) error { return inspect.WriteAdapterFileText(w, r) }
	if opts.JSON {
		write = func(w io.Writer) error { return inspect.WriteAdapterFileJSON(w, r) }
	}
	return openOutput(opts.IO, opts.Output, write)
}
