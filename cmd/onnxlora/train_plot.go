package main

import (
	"fmt"
	"image/color"
	"io"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/train"
)

// writePlot draws the train loss per step and the eval loss per eval to an
// .svg or .png file, written atomically.
func writePlot(path string, history []train.Record) error {
	var tr, ev plotter.XYs
	for _, r := range history {
		if r.Eval {
			ev = append(ev, plotter.XY{X: float64(r.Step), Y: r.EvalLoss})
		} else {
			tr = append(tr, plotter.XY{X: float64(r.Step), Y: r.Loss})
		}
	}
	p := plot.New()
	p.Title.Text = "onnxlora train"
	p.X.Label.Text = "optimizer step"
	p.Y.Label.Text = "loss"
	p.Add(plotter.NewGrid())
	if len(tr) > 0 {
		l, err := plotter.NewLine(tr)
		if err != nil {
			return fmt.Errorf("--plot: %w", err)
		}
		l.Color = color.RGBA{R: 30, G: 90, B: 200, A: 255}
		p.Add(l)
		p.Legend.Add("train loss", l)
	}
	if len(ev) > 0 {
		l, pts, err := plotter.NewLinePoints(ev)
		if err != nil {
			return fmt.Errorf("--plot: %w", err)
		}
		orange := color.RGBA{R: 230, G: 120, B: 20, A: 255}
		l.Color, pts.Color = orange, orange
		p.Add(l, pts)
		p.Legend.Add("eval loss", l, pts)
	}
	p.Legend.Top = true
	format := strings.TrimPrefix(filepath.Ext(path), ".")
	w, err := p.WriterTo(16*vg.Centimeter, 10*vg.Centimeter, format)
	if err != nil {
		return fmt.Errorf("--plot: %w", err)
	}
	return graph.WriteFileAtomic(path, func(out io.Writer) error {
		_, err := w.WriteTo(out)
		return err
	})
}
