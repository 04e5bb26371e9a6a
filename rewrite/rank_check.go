package rewrite

import (
	"fmt"

	"github.com/onnxlora/onnxlora/graph"
)

// checkRanks refuses ranks the selected layers cannot use or the machine
// cannot hold, before anything is allocated. A rank above min(in, out) of
// a layer (in·kernel for a Conv) gives an update no more expressive, only larger; PEFT allows it,
// and a broad selection (all-linear beside a 2-class head) meets it
// naturally, so it is refused only when it holds for every selected layer
// (a mistyped rank) unless allowLarge. The adapters A [in, r] and B [r, out]
// (built in float64) of all layers must fit in memory either way.
func checkRanks(layers []*Layer, sel []Selection, allowLarge bool) error {
	above := 0
	var widest int64
	for _, s := range sel {
		l := layers[s.Index]
		if s.Rank <= 0 {
			return fmt.Errorf("module %s: rank must be positive, got %d", l.Module, s.Rank)
		}
		// A Conv's update is [out, in·kernel]: PEFT's bound.
		lim := min(l.In*max(l.KernelSize(), 1), l.Out)
		widest = max(widest, lim)
		if int64(s.Rank) > lim {
			above++
		}
	}
	if len(sel) > 0 && above == len(sel) && !allowLarge {
		l := layers[sel[0].Index]
		return fmt.Errorf("rank %d is more than min(in, out) of every selected layer (at most %d; %s is [%d,%d]): an update of that rank is no more expressive, only larger (--allow-large-rank to insist)", sel[0].Rank, widest, l.Module, l.In, l.Out)
	}
	const maxBytes = int64(1) << 60
	var total int64
	for _, s := range sel {
		l := layers[s.Index]
		r := int64(s.Rank)
		// A Conv layer's A holds in·kernel values per rank.
		k := l.KernelSize()
		if k <= 0 || l.In > maxBytes/k {
			return fmt.Errorf("module %s: kernel %v is too large", l.Module, l.Kernel)
		}
		per := l.In*k + l.Out
		if per <= 0 || r > maxBytes/8/per {
			return fmt.Errorf("module %s: rank %d makes adapters with too many elements", l.Module, s.Rank)
		}
		total = min(total+8*r*per, maxBytes)
		if err := graph.CheckAlloc(total, fmt.Sprintf("module %s: rank %d adapters [%d,%d] and [%d,%d]", l.Module, s.Rank, l.In, s.Rank, s.Rank, l.Out)); err != nil {
			return err
		}
	}
	return nil
}
