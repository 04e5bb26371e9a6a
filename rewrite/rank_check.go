package rewrite

import (
	"fmt"

	"github.com/onnxlora/onnxlora/graph"
)

// checkRank refuses a rank the layer cannot use or the machine cannot hold,
// before anything is allocated: r must be at most min(in, out) unless
// allowLarge, and A [in, r] and B [r, out] (built in float64) must fit in
// memory.
func checkRank(l *Layer, rank int, allowLarge bool) error {
	in, out := l.In, l.Out
	if rank <= 0 {
		return fmt.Errorf("module %s: rank must be positive, got %d", l.Module, rank)
	}
	if lim := min(in, out); int64(rank) > lim && !allowLarge {
		return fmt.Errorf("module %s: rank %d is more than min(in, out) = %d of its [%d,%d] weight; an update of that rank is no more expressive, only larger (--allow-large-rank to insist)", l.Module, rank, lim, in, out)
	}
	const maxElems = int64(1) << 56
	r := int64(rank)
	if in+out <= 0 || r > maxElems/(in+out) {
		return fmt.Errorf("module %s: rank %d makes adapters with too many elements", l.Module, rank)
	}
	return graph.CheckAlloc(8*r*(in+out), fmt.Sprintf("module %s: rank %d adapters [%d,%d] and [%d,%d]", l.Module, rank, in, rank, rank, out))
}
