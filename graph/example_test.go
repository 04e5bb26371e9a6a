package graph_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/onnxlora/onnxlora/graph"
)

// Load a model with external data, find the weights of its MatMuls (one
// reached through a Transpose and a Cast), change one and save the model
// to a new folder. The input files are never modified.
func Example() {
	m, err := graph.Load("testdata/example/model.onnx")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	g := m.Graph()
	for _, n := range g.Proto.Node {
		if n.GetOpType() != "MatMul" {
			continue
		}
		w := g.ResolveWeight(n.Input[1])
		fmt.Printf("%s: %s %v stored %v, seen as %v, through %d node(s), transposed %v, shared %v\n",
			n.GetName(), w.Name, w.DataType(), w.Tensor.Dims, w.Dims(), len(w.Chain), w.Transposed, g.IsShared(w, n))
	}

	// Double q.weight. It is FLOAT16: values are rounded to nearest even.
	q := g.ResolveWeight("q.weight_f")
	vals, err := m.Float64s(q.Tensor)
	if err != nil {
		log.Fatal(err)
	}
	for i := range vals {
		vals[i] *= 2
	}
	if err := graph.SetFloat64s(q.Tensor, vals); err != nil {
		log.Fatal(err)
	}

	dir, err := os.MkdirTemp("", "example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "model.onnx")
	// The input has external data, so by default the output does too; the
	// edited tensor, now in memory and under 1 KiB, is written inline.
	if err := m.Save(out, graph.SaveOptions{}); err != nil {
		log.Fatal(err)
	}

	saved, err := graph.Load(out)
	if err != nil {
		log.Fatal(err)
	}
	defer saved.Close()
	for _, t := range saved.Proto.Graph.Initializer {
		vals, err := saved.Float64s(t)
		if err != nil {
			log.Fatal(err)
		}
		where := "inline"
		if graph.IsExternal(t) {
			ref, err := saved.ExternalRef(t)
			if err != nil {
				log.Fatal(err)
			}
			where = fmt.Sprintf("in %s at offset %d", ref.Location, ref.Offset)
		}
		fmt.Printf("%s %s: %v\n", t.GetName(), where, vals)
	}
	// Output:
	// q_proj: q.weight FLOAT16 stored [2 3], seen as [3 2], through 2 node(s), transposed true, shared false
	// k_proj: k.weight FLOAT stored [3 2], seen as [3 2], through 0 node(s), transposed false, shared false
	// q.weight inline: [2 4 6 8 10 12]
	// k.weight in model.onnx.data at offset 0: [0.5 1 1.5 2 2.5 3]
}
