package inspect

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

// SpectraReport is what `onnxlora inspect --spectra` prints: the singular
// values of every adapter's update ΔW = scaling·A·B.
type SpectraReport struct {
	SchemaVersion int                       `json:"schema_version"`
	Model         string                    `json:"model"`
	Adapters      []rewrite.AdapterSpectrum `json:"adapters"`
}

// BuildSpectra computes the spectra of the model's adapters (it reads A
// and B, never the base weights).
func BuildSpectra(m *graph.Model) (*SpectraReport, error) {
	sp, err := rewrite.Spectra(m)
	if err != nil {
		return nil, err
	}
	if len(sp) == 0 {
		return nil, errors.New("the model has no LoRA adapters (no manifest and no branch of the shape inject writes)")
	}
	return &SpectraReport{SchemaVersion: SchemaVersion, Model: m.Path(), Adapters: sp}, nil
}

// energyRank is the smallest rank keeping the fraction e of Σ σ² (0 for a
// zero update).
func energyRank(s []float64, e float64) int {
	var total, acc float64
	for _, x := range s {
		total += x * x
	}
	if total == 0 {
		return 0
	}
	for i, x := range s {
		acc += x * x
		if acc >= e*total*(1-1e-12) {
			return i + 1
		}
	}
	return len(s)
}

// WriteSpectraText writes one line per adapter: rank, ‖ΔW‖_F, the ranks
// keeping 90% and 99% of Σ σ², and the singular values.
func WriteSpectraText(w io.Writer, r *SpectraReport) error {
	bw := bufio.NewWriter(w)
	tw := tabwriter.NewWriter(bw, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODULE\tRANK\t‖ΔW‖_F\tR@90%\tR@99%\tSINGULAR VALUES")
	for _, a := range r.Adapters {
		vals := make([]string, len(a.Singular))
		for i, s := range a.Singular {
			vals[i] = fmt.Sprintf("%.4g", s)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.4g\t%d\t%d\t%s\n", a.Module, a.Rank, frobenius(a.Singular),
			energyRank(a.Singular, 0.9), energyRank(a.Singular, 0.99), strings.Join(vals, " "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(bw, "R@90%/R@99%: the smallest rank keeping that share of Σσ² (what resize --energy would pick); 0 for an untrained adapter.")
	return bw.Flush()
}

// WriteSpectraJSON writes the report as indented JSON.
func WriteSpectraJSON(w io.Writer, r *SpectraReport) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

// maxLegend caps the legend; more adapters are drawn but not named.
const maxLegend = 12

// WriteSpectraPlot draws every adapter's singular values against their
// index (on a log scale when they span more than a factor 20), to an .svg, .png or .pdf file (by its extension),
// written atomically. Zero singular values have no place on a log scale
// and are left out; an adapter with no positive value is not drawn.
func WriteSpectraPlot(path string, r *SpectraReport) error {
	format := strings.ToLower(strings.TrimPrefix(filepath.Ext(path), "."))
	switch format {
	case "svg", "png", "pdf":
	default:
		return fmt.Errorf("plot %s: want a .svg, .png or .pdf file", path)
	}
	p := plot.New()
	p.Title.Text = "singular values of scaling·A·B"
	p.X.Label.Text = "index k"
	p.Y.Label.Text = "σ_k"
	// A log scale when the values span decades; a narrow spectrum would
	// get no labelled tick on one.
	lo, hi := math.Inf(1), 0.0
	for _, a := range r.Adapters {
		for _, s := range a.Singular {
			if s > 0 && !math.IsInf(s, 0) {
				lo, hi = math.Min(lo, s), math.Max(hi, s)
			}
		}
	}
	if hi > 0 && hi/lo > 20 {
		p.Y.Scale = plot.LogScale{}
		p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	p.Add(plotter.NewGrid())
	drawn := 0
	for i, a := range r.Adapters {
		var pts plotter.XYs
		for k, s := range a.Singular {
			if s > 0 && !math.IsInf(s, 0) {
				pts = append(pts, plotter.XY{X: float64(k + 1), Y: s})
			}
		}
		if len(pts) == 0 {
			continue
		}
		l, sc, err := plotter.NewLinePoints(pts)
		if err != nil {
			return fmt.Errorf("plot: %w", err)
		}
		c := plotutil.Color(i)
		l.Color, sc.Color = c, c
		sc.Shape = plotutil.Shape(i)
		p.Add(l, sc)
		if drawn < maxLegend {
			p.Legend.Add(a.Module, l, sc)
		}
		drawn++
	}
	if drawn == 0 {
		return errors.New("plot: no adapter has a non-zero singular value (untrained adapters have B = 0)")
	}
	// Spectra fall from left to right: the bottom left corner is free.
	p.Legend.Top, p.Legend.Left = false, true
	p.Legend.YOffs = vg.Centimeter / 2
	wt, err := p.WriterTo(18*vg.Centimeter, 12*vg.Centimeter, format)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	return graph.WriteFileAtomic(path, func(out io.Writer) error {
		_, err := wt.WriteTo(out)
		return err
	})
}
