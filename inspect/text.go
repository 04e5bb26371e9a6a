package inspect

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// WriteJSON writes the report as indented JSON followed by a newline. Field
// order is fixed by the struct, lists are never null, and floats are printed
// by encoding/json, so the output is stable for scripts and golden files.
func WriteJSON(w io.Writer, r *Report) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	_, err = w.Write(data)
	return err
}

// WriteText writes the report as aligned plain-text tables.
func WriteText(w io.Writer, r *Report) error {
	bw := bufio.NewWriter(w)
	writeHeader(bw, r)
	writeLayers(bw, r)
	if r.Selection != nil {
		writeSelection(bw, r)
	}
	if len(r.Adapters) > 0 {
		writeAdapters(bw, r)
	}
	if len(r.Skipped) > 0 {
		writeSkipped(bw, r)
	}
	return bw.Flush()
}

func writeHeader(w io.Writer, r *Report) {
	m := r.Model
	tw := newTable(w)
	row := func(k, v string) { fmt.Fprintf(tw, "%s\t%s\n", k, v) }
	if m.Path != "" {
		row("Model:", fmt.Sprintf("%s (%s)", m.Path, formatBytes(m.FileBytes)))
	}
	producer := strings.TrimSpace(m.ProducerName + " " + m.ProducerVersion)
	if producer == "" {
		producer = "(not recorded)"
	}
	row("Producer:", producer)
	row("IR version:", strconv.FormatInt(m.IRVersion, 10))
	var opsets []string
	for _, o := range m.Opsets {
		d := o.Domain
		if d == "" {
			d = "ai.onnx"
		}
		opsets = append(opsets, fmt.Sprintf("%s %d", d, o.Version))
	}
	if len(opsets) == 0 {
		opsets = []string{"(none)"}
	}
	row("Opsets:", strings.Join(opsets, ", "))
	graphLine := fmt.Sprintf("%s nodes", commas(int64(m.Nodes)))
	if m.Subgraphs > 0 {
		graphLine += " (with " + pluralize(m.Subgraphs, "subgraph") + ")"
	}
	graphLine += fmt.Sprintf(", %s initializers, %s float params", commas(int64(m.Initializers)), commas(m.Params))
	row("Graph:", graphLine)
	if m.External.Tensors == 0 {
		row("External data:", "none")
	} else {
		row("External data:", fmt.Sprintf("%s, %s in %s", pluralize(m.External.Tensors, "tensor"), formatBytes(m.External.Bytes), pluralize(len(m.External.Files), "file")))
		for _, f := range m.External.Files {
			row("", fmt.Sprintf("%s: %s, %s (file size %s)", f.Location, pluralize(f.Tensors, "tensor"), formatBytes(f.Bytes), formatBytes(f.FileBytes)))
		}
	}
	tw.Flush()
}

func writeLayers(w io.Writer, r *Report) {
	fmt.Fprintf(w, "\nAdaptable layers: %d\n", len(r.Layers))
	if len(r.Layers) == 0 {
		fmt.Fprintln(w, "  (no MatMul or Gemm with a constant 2-D float weight)")
		return
	}
	sel := r.Selection != nil
	adapted := r.Totals.Adapted > 0
	tw := newTable(w)
	head := "  MODULE\tOP\tNODE\tWEIGHT\t[IN,OUT]\tDTYPE\tPARAMS"
	if sel {
		head += "\tSELECTED"
	}
	if adapted {
		head += "\tADAPTER"
	}
	head += "\tNOTES"
	fmt.Fprintln(tw, head)
	for _, l := range r.Layers {
		node := l.Node
		if node == "" {
			node = "(unnamed)"
		}
		if l.Graph != "" {
			node += " in " + l.Graph
		}
		weight := l.Weight
		if len(l.Via) > 0 {
			weight += " via " + strings.Join(l.Via, ",")
		}
		dtype := l.DType
		if l.StoredDType != l.DType {
			dtype = l.StoredDType + "->" + l.DType
		}
		var notes []string
		if l.Shared {
			notes = append(notes, "shared weight")
		}
		if l.OutputHead {
			notes = append(notes, "output head")
		}
		line := fmt.Sprintf("  %s\t%s\t%s\t%s\t[%d,%d]\t%s\t%s", l.Module, l.Op, node, weight, l.In, l.Out, dtype, commas(l.Params))
		if sel {
			line += "\t" + yes(l.Selected)
		}
		if adapted {
			line += "\t" + yes(l.Adapted)
		}
		line += "\t" + strings.Join(notes, ", ")
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
	t := r.Totals
	fmt.Fprintf(w, "  total: %d layers, %s weight params", t.Layers, commas(t.Params))
	if t.Shared > 0 {
		fmt.Fprintf(w, " (shared weights counted once), %d with a shared weight", t.Shared)
	}
	fmt.Fprintln(w)
}

func writeSelection(w io.Writer, r *Report) {
	s := r.Selection
	fmt.Fprintf(w, "\nSelection: %s\n", describeSelection(s))
	fmt.Fprintf(w, "  would adapt %d of %d layers\n", len(s.Modules), len(r.Layers))
	tw := newTable(w)
	fmt.Fprintln(tw, "  MODULE\tRANK\tALPHA\tPARAMS\t")
	for _, m := range s.Modules {
		note := ""
		if m.Adapted {
			note = "already adapted: inject refuses it"
		}
		fmt.Fprintf(tw, "  %s\t%d\t%s\t%s\t%s\n", m.Module, m.Rank, formatFloat(m.Alpha), commas(m.Params), note)
	}
	tw.Flush()
	for _, u := range s.Unmatched {
		fmt.Fprintf(w, "  note: target %q matches no module\n", u)
	}
	fmt.Fprintf(w, "  %s\n", s.Summary)
}

func describeSelection(s *Selection) string {
	var parts []string
	if len(s.Targets) > 0 {
		parts = append(parts, "target "+strings.Join(s.Targets, ","))
	}
	if s.TargetRegex != "" {
		parts = append(parts, "target regex "+strconv.Quote(s.TargetRegex))
	}
	if len(s.Exclude) > 0 {
		parts = append(parts, "exclude "+strings.Join(s.Exclude, ","))
	}
	if s.ExcludeRegex != "" {
		parts = append(parts, "exclude regex "+strconv.Quote(s.ExcludeRegex))
	}
	if len(s.Layers) > 0 {
		ls := make([]string, len(s.Layers))
		for i, l := range s.Layers {
			ls[i] = strconv.Itoa(l)
		}
		parts = append(parts, "layers "+strings.Join(ls, ","))
	}
	parts = append(parts, fmt.Sprintf("rank %d", s.Rank), "alpha "+formatFloat(s.Alpha))
	return strings.Join(parts, "; ")
}

func writeAdapters(w io.Writer, r *Report) {
	if r.AdaptersRecognized {
		fmt.Fprintf(w, "\nAdapters: %d (found by their branch shape: the model has no onnxlora.adapters manifest)\n", len(r.Adapters))
	} else {
		fmt.Fprintf(w, "\nAdapters: %d (from the model's onnxlora.adapters manifest)\n", len(r.Adapters))
	}
	tw := newTable(w)
	fmt.Fprintln(tw, "  MODULE\tRANK\tALPHA\tSCALING\t[IN,OUT]\tDTYPE\tPARAMS\t||scaling*A*B||_F")
	var params int64
	for _, a := range r.Adapters {
		norm := "?"
		if a.Norm != nil {
			norm = formatFloat(*a.Norm)
		} else if a.Error == "" {
			norm = "-"
		}
		scaling := formatFloat(a.Scaling)
		if a.RSLoRA {
			scaling += " (rsLoRA)"
		}
		fmt.Fprintf(tw, "  %s\t%d\t%s\t%s\t[%d,%d]\t%s\t%s\t%s\n", a.Module, a.Rank, formatFloat(a.Alpha), scaling, a.In, a.Out, a.DType, commas(a.Params), norm)
		params += a.Params
	}
	tw.Flush()
	fmt.Fprintf(w, "  total: %s adapter params\n", commas(params))
	for _, s := range r.Saved {
		tensors := s.Weight
		if s.Bias != "" {
			tensors += ", " + s.Bias
		}
		fmt.Fprintf(w, "  %s is trained whole (modules_to_save): %s\n", s.Module, tensors)
	}
	for _, a := range r.Adapters {
		if a.Error != "" {
			fmt.Fprintf(w, "  %s: norm unavailable: %s\n", a.Module, a.Error)
		}
	}
}

func writeSkipped(w io.Writer, r *Report) {
	fmt.Fprintf(w, "\nSkipped MatMul-like nodes: %d\n", len(r.Skipped))
	tw := newTable(w)
	fmt.Fprintln(tw, "  NODE\tOP\tREASON")
	for _, s := range r.Skipped {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", s.Node, s.Op, s.Reason)
	}
	tw.Flush()
}

// table aligns tab-separated cells and trims the spaces tabwriter leaves
// after an empty last cell, so the output has no trailing whitespace.
type table struct {
	*tabwriter.Writer
	buf bytes.Buffer
	out io.Writer
}

func newTable(w io.Writer) *table {
	t := &table{out: w}
	t.Writer = tabwriter.NewWriter(&t.buf, 0, 0, 2, ' ', 0)
	return t
}

// Flush writes the aligned table.
func (t *table) Flush() error {
	if err := t.Writer.Flush(); err != nil {
		return err
	}
	for _, line := range strings.SplitAfter(t.buf.String(), "\n") {
		if line == "" {
			continue
		}
		nl := strings.HasSuffix(line, "\n")
		line = strings.TrimRight(line, " \n")
		if nl {
			line += "\n"
		}
		if _, err := io.WriteString(t.out, line); err != nil {
			return err
		}
	}
	t.buf.Reset()
	return nil
}

func yes(b bool) string {
	if b {
		return "yes"
	}
	return ""
}

// commas formats an integer with thousands separators.
func commas(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// formatBytes prints a byte count exactly and, past 1 KiB, in binary units.
func formatBytes(n int64) string {
	s := commas(n) + " bytes"
	units := []string{"KiB", "MiB", "GiB", "TiB"}
	v := float64(n)
	unit := ""
	for _, u := range units {
		if v < 1024 {
			break
		}
		v /= 1024
		unit = u
	}
	if unit != "" {
		s += fmt.Sprintf(", %.1f %s", v, unit)
	}
	return s
}

// formatFloat prints a float in its shortest form (16, 0.5, 2.82843).
func formatFloat(v float64) string {
	return strconv.FormatFloat(round6(v), 'g', -1, 64)
}
