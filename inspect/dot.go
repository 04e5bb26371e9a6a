package inspect

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// DOTOptions chooses what WriteDOT draws.
type DOTOptions struct {
	// Layer, when set, keeps only layers whose module path it matches
	// (anywhere in the path, like grep; anchor it with ^ and $).
	Layer *regexp.Regexp
}

// DrawnLayers returns the layers WriteDOT draws: the selected and adapted
// layers, or every layer when there are neither, narrowed by opts.Layer.
func DrawnLayers(r *Report, opts DOTOptions) []Layer {
	narrow := false
	for _, l := range r.Layers {
		if l.Selected || l.Adapted {
			narrow = true
			break
		}
	}
	var out []Layer
	for _, l := range r.Layers {
		if narrow && !l.Selected && !l.Adapted {
			continue
		}
		if opts.Layer != nil && !opts.Layer.MatchString(l.Module) {
			continue
		}
		out = append(out, l)
	}
	return out
}

// WriteDOT draws the layers DrawnLayers picks as a Graphviz digraph, one
// cluster per layer: the input x, the base weight (and the Transpose/Cast
// chain it goes through), the base node, and the adapter's A, B, scaling,
// MatMuls, Mul and Add leading to the layer's output y. Adapters the
// selection would add are drawn dashed. It fails when no layer is left to
// draw. Render with `dot -Tsvg` or `dot -Tpng`.
func WriteDOT(w io.Writer, r *Report, opts DOTOptions) error {
	layers := DrawnLayers(r, opts)
	if len(layers) == 0 {
		if opts.Layer != nil {
			return fmt.Errorf("no layer to draw matches %q", opts.Layer.String())
		}
		return fmt.Errorf("the model has no adaptable layer to draw")
	}
	adapters := map[string]Adapter{}
	for _, a := range r.Adapters {
		adapters[a.Module] = a
	}
	planned := map[string]SelectedModule{}
	if r.Selection != nil {
		for _, m := range r.Selection.Modules {
			planned[m.Module] = m
		}
	}

	bw := bufio.NewWriter(w)
	title := r.Model.Path
	if title == "" {
		title = "model"
	}
	fmt.Fprintln(bw, "digraph onnxlora {")
	fmt.Fprintf(bw, "  label=%s;\n", quote(title+": "+pluralize(len(layers), "layer")))
	fmt.Fprintln(bw, `  labelloc=t; fontname="Helvetica"; fontsize=14; rankdir=TB; newrank=true;`)
	fmt.Fprintln(bw, `  node [fontname="Helvetica", fontsize=10, shape=box, style="rounded,filled", fillcolor=white];`)
	fmt.Fprintln(bw, `  edge [fontname="Helvetica", fontsize=9, color="#555555"];`)
	for i, l := range layers {
		d := dotLayer{w: bw, id: fmt.Sprintf("l%d", i)}
		d.layer(l, adapters, planned)
	}
	fmt.Fprintln(bw, "}")
	return bw.Flush()
}

// dotLayer writes one layer's cluster.
type dotLayer struct {
	w  io.Writer
	id string
}

func (d dotLayer) node(name, label, attrs string) string {
	id := d.id + "_" + name
	if attrs != "" {
		attrs = ", " + attrs
	}
	fmt.Fprintf(d.w, "    %s [label=%s%s];\n", id, quote(label), attrs)
	return id
}

func (d dotLayer) edge(from, to, attrs string) {
	if attrs != "" {
		attrs = " [" + attrs + "]"
	}
	fmt.Fprintf(d.w, "    %s -> %s%s;\n", from, to, attrs)
}

const (
	valueStyle   = `shape=ellipse, style=filled, fillcolor="#f2f2f2"`
	weightStyle  = `shape=box, style=filled, fillcolor="#d9d9d9"`
	loraStyle    = `shape=box, style=filled, fillcolor="#cfe2ff"`
	plannedStyle = `shape=box, style="dashed,filled", fillcolor="#eef4ff"`
	loraOpStyle  = `style="rounded,filled", fillcolor="#e7f0ff"`
	plannedOp    = `style="rounded,dashed,filled", fillcolor="#f7faff"`
)

func (d dotLayer) layer(l Layer, adapters map[string]Adapter, planned map[string]SelectedModule) {
	a, hasAdapter := adapters[l.Module]
	p, isPlanned := planned[l.Module]
	label := fmt.Sprintf("%s\n%s [%d,%d] %s", l.Module, l.Op, l.In, l.Out, l.DType)
	switch {
	case hasAdapter:
		label += fmt.Sprintf("\nLoRA r=%d alpha=%s scaling=%s", a.Rank, formatFloat(a.Alpha), formatFloat(a.Scaling))
	case isPlanned:
		label += fmt.Sprintf("\nplanned LoRA r=%d alpha=%s", p.Rank, formatFloat(p.Alpha))
	}
	fmt.Fprintf(d.w, "  subgraph cluster_%s {\n", d.id)
	fmt.Fprintf(d.w, "    label=%s; style=rounded; color=\"#888888\"; fontsize=11;\n", quote(label))

	x := d.node("x", "x\n"+ellipsis(l.Input, 48), valueStyle)
	wLabel := "W " + ellipsis(l.Weight, 40) + "\n" + shapeOf(l)
	if l.Shared {
		wLabel += "\n(shared)"
	}
	w := d.node("w", wLabel, weightStyle)
	for i, op := range l.Via {
		v := d.node(fmt.Sprintf("via%d", i), op, "")
		d.edge(w, v, "")
		w = v
	}
	baseLabel := l.Op
	if l.Node != "" {
		baseLabel += "\n" + ellipsis(l.Node, 48)
	}
	base := d.node("base", baseLabel, "")
	y := d.node("y", "y\n"+ellipsis(l.Output, 48), valueStyle)
	d.edge(x, base, "")
	d.edge(w, base, `label="W"`)

	var rank int
	var tensorStyle, opStyle, aName, bName, scaling string
	switch {
	case hasAdapter:
		rank, tensorStyle, opStyle = a.Rank, loraStyle, loraOpStyle
		aName, bName, scaling = shortName(a.LoraA, l.Module), shortName(a.LoraB, l.Module), formatFloat(a.Scaling)
	case isPlanned:
		rank, tensorStyle, opStyle = p.Rank, plannedStyle, plannedOp
		aName, bName, scaling = "lora_A.weight (planned)", "lora_B.weight (planned)", formatFloat(p.Alpha/float64(p.Rank))
	default:
		d.edge(base, y, "")
		fmt.Fprintln(d.w, "  }")
		return
	}
	edgeStyle := ""
	if !hasAdapter {
		edgeStyle = "style=dashed"
	}
	in := x
	if hasAdapter && a.Dropout > 0 {
		in = d.node("dropout", "Dropout\np="+formatFloat(a.Dropout), opStyle)
		d.edge(x, in, edgeStyle)
	}
	A := d.node("A", fmt.Sprintf("%s\n[%d,%d]", aName, l.In, rank), tensorStyle)
	B := d.node("B", fmt.Sprintf("%s\n[%d,%d]", bName, rank, l.Out), tensorStyle)
	S := d.node("s", "scaling\n"+scaling, tensorStyle)
	mA := d.node("mA", "MatMul", opStyle)
	mB := d.node("mB", "MatMul", opStyle)
	mul := d.node("mul", "Mul", opStyle)
	add := d.node("add", "Add", opStyle)
	d.edge(in, mA, edgeStyle)
	d.edge(A, mA, edgeStyle)
	d.edge(mA, mB, edgeStyle)
	d.edge(B, mB, edgeStyle)
	d.edge(mB, mul, edgeStyle)
	d.edge(S, mul, edgeStyle)
	d.edge(base, add, `label="base"`)
	d.edge(mul, add, edgeStyle)
	d.edge(add, y, "")
	fmt.Fprintf(d.w, "    { rank=same; %s; %s; }\n", base, mB)
	fmt.Fprintln(d.w, "  }")
}

func shapeOf(l Layer) string {
	s := fmt.Sprintf("[%d,%d] %s", l.In, l.Out, l.DType)
	if l.StoredDType != l.DType {
		s = fmt.Sprintf("[%d,%d] %s->%s", l.In, l.Out, l.StoredDType, l.DType)
	}
	return s
}

// shortName drops the module prefix the cluster label already shows
// ("<module>.lora_A.weight" -> "lora_A.weight").
func shortName(name, module string) string {
	if rest, ok := strings.CutPrefix(name, module+"."); ok {
		return rest
	}
	return ellipsis(name, 40)
}

// quote makes a DOT string literal.
func quote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	return `"` + r.Replace(s) + `"`
}

// ellipsis shortens long names in the middle, keeping both ends readable.
func ellipsis(s string, max int) string {
	rs := []rune(s)
	if len(rs) <= max {
		return s
	}
	half := (max - 3) / 2
	return string(rs[:half]) + "..." + string(rs[len(rs)-(max-3-half):])
}

func pluralize(n int, word string) string {
	if n == 1 {
		return fmt.Sprintf("1 %s", word)
	}
	return fmt.Sprintf("%d %ss", n, word)
}
