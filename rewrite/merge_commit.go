package rewrite

import (
	"fmt"
	"strings"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// applyInMemory computes every merged weight, checks them, then changes
// the model: nothing is touched before all results are ready.
func (p *plan) applyInMemory() (*MergeReport, error) {
	err := parallel(len(p.updates), func(i int) error {
		u := p.updates[i]
		if err := u.factors(); err != nil {
			return err
		}
		defer u.release()
		src, err := p.m.RawData(u.src)
		if err != nil {
			return err
		}
		if u.srcT {
			src = transposeRaw(src, graph.DataType(u.src.GetDataType()).BitSize()/8, u.cols, u.rows)
		}
		u.out = make([]byte, u.rows*u.cols*elemSize(u.dst))
		u.stats = mergeRows(u.out, src, u, 0, u.rows, make([]float64, 2*u.cols))
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := p.checkSafe(); err != nil {
		return nil, err
	}
	for _, u := range p.updates {
		if err := graph.SetRawData(u.dst, u.out); err != nil {
			return nil, err
		}
		u.out = nil
	}
	if err := p.commitGraph(); err != nil {
		return nil, err
	}
	return p.finish(), nil
}

// checkSafe fills the report's statistics and, with Safe, refuses NaN/Inf.
func (p *plan) checkSafe() error {
	var bad []string
	for _, u := range p.updates {
		u.rep.MaxDelta, u.rep.Changed, u.rep.NonFinite = u.stats.maxAbs, u.stats.changed, u.stats.nonFinite
		if u.stats.nonFinite > 0 {
			bad = append(bad, fmt.Sprintf("%s (%d of %d values of %s)", u.rep.Module, u.stats.nonFinite, u.rep.Elements, u.rep.Weight))
		}
	}
	if p.opts.Safe && len(bad) > 0 {
		return fmt.Errorf("safe merge: merging would write NaN or infinite weights in %s; the model was not changed", strings.Join(bad, ", "))
	}
	return nil
}

func (p *plan) finish() *MergeReport {
	for _, u := range p.updates {
		p.report.Merged = append(p.report.Merged, *u.rep)
	}
	for _, sr := range p.stacked {
		sr.rep.MaxDelta, sr.rep.Changed, sr.rep.NonFinite = sr.into.rep.MaxDelta, sr.into.rep.Changed, sr.into.rep.NonFinite
		p.report.Merged = append(p.report.Merged, *sr.rep)
	}
	return p.report
}

// commitGraph makes the planned graph edits: branch nodes out, base outputs
// renamed back, copies of shared weights in, unused adapter constants and
// the manifest entries of merged adapters out.
func (p *plan) commitGraph() error {
	for _, b := range p.branches {
		// With stacked branches (inject --stack) the value under this one
		// may come from another branch, and this one's root may already
		// write what an outer branch wrote: look both up now.
		nodes := b.nodes()
		out := nodes[0].Output[0] // the root, first in nodes()
		under := b.Graph.Producer(b.BaseOutput)
		if under == nil {
			under = b.Base
		}
		gone := map[string]bool{b.BaseOutput: true}
		for _, n := range nodes {
			if err := b.Graph.RemoveNode(n); err != nil {
				return err
			}
			for _, o := range n.Output {
				if o != out {
					gone[o] = true
				}
			}
		}
		b.Graph.SetOutput(under, 0, out)
		vis := b.Graph.Proto.ValueInfo[:0]
		for _, vi := range b.Graph.Proto.ValueInfo {
			if !gone[vi.GetName()] {
				vis = append(vis, vi)
			}
		}
		b.Graph.Proto.ValueInfo = vis
	}
	if err := p.commitQuant(); err != nil {
		return err
	}
	for _, ni := range p.inits {
		ni.g.AddInitializer(ni.t)
	}
	for _, rw := range p.rewires {
		rw.g.SetInput(rw.node, rw.input, rw.value)
	}
	p.top.Reindex()
	for _, b := range p.branches {
		for _, name := range []string{b.A, b.B, b.S, b.Ratio} {
			if name == "" {
				continue
			}
			if b.isInputs() && (name == b.A || name == b.B) {
				dropInput(b.Graph, name)
				continue
			}
			dropConstant(b.Graph, name)
		}
	}
	if p.setManifest {
		return WriteManifest(p.m, p.manifest)
	}
	return nil
}

// dropInput removes a graph input nobody reads any more (an adapter input
// of a merged branch) with its initializer default.
func dropInput(g *graph.Graph, name string) {
	for s := g; s != nil; s = s.Parent {
		if s.IsGraphInput(name) {
			if countReaders(s, name, func(*onnxpb.NodeProto) bool { return false }) == 0 {
				s.RemoveInitializer(name)
			}
			return
		}
	}
}

// dropConstant removes an initializer or Constant node nobody reads.
func dropConstant(g *graph.Graph, name string) {
	t, c, scope := g.ConstantTensor(name)
	if t == nil || countReaders(scope, name, func(*onnxpb.NodeProto) bool { return false }) > 0 {
		return
	}
	if c != nil {
		scope.RemoveNode(c)
		return
	}
	scope.RemoveInitializer(name)
}
