package graph

import (
	"container/heap"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Toposort orders the nodes so that each comes after the producers of its
// inputs (including values its subgraphs capture), keeping the existing
// order wherever it is already valid. Real exporters write unsorted graphs;
// this accepts them. A cycle is reported with the nodes on it. Subgraphs
// are sorted too.
func (g *Graph) Toposort() error {
	nodes := g.Proto.Node
	pos := make(map[*onnxpb.NodeProto]int, len(nodes))
	for i, n := range nodes {
		pos[n] = i
	}
	// deps[i] = indices of nodes in this graph that node i waits for.
	waits := make([]int, len(nodes))
	users := make([][]int, len(nodes))
	for i, n := range nodes {
		seen := map[int]bool{}
		for _, in := range g.nodeReads(n) {
			p, ok := g.producer[in]
			if !ok {
				continue
			}
			j := pos[p]
			if j == i || seen[j] {
				if j == i {
					return fmt.Errorf("graph %q: node %s reads its own output %q", g.Proto.GetName(), nodeLabel(n), in)
				}
				continue
			}
			seen[j] = true
			waits[i]++
			users[j] = append(users[j], i)
		}
	}
	// Kahn's algorithm with a min-heap on original position keeps the
	// original order whenever it is valid.
	ready := &minHeap{}
	for i := range nodes {
		if waits[i] == 0 {
			ready.a = append(ready.a, i) // ascending: already a heap
		}
	}
	order := make([]*onnxpb.NodeProto, 0, len(nodes))
	for ready.Len() > 0 {
		i := heap.Pop(ready).(int)
		order = append(order, nodes[i])
		for _, u := range users[i] {
			waits[u]--
			if waits[u] == 0 {
				heap.Push(ready, u)
			}
		}
	}
	if len(order) != len(nodes) {
		// Nodes left waiting are on a cycle or downstream of one; peel off
		// those that nothing left waiting depends on, to name the cycle.
		left := map[int]bool{}
		for i := range nodes {
			if waits[i] > 0 {
				left[i] = true
			}
		}
		for changed := true; changed; {
			changed = false
			for i := range left {
				feeds := false
				for _, u := range users[i] {
					feeds = feeds || left[u]
				}
				if !feeds {
					delete(left, i)
					changed = true
				}
			}
		}
		var stuck []string
		for i, n := range nodes {
			if left[i] {
				stuck = append(stuck, nodeLabel(n))
			}
		}
		if len(stuck) > 8 {
			stuck = append(stuck[:8], fmt.Sprintf("and %d more", len(stuck)-8))
		}
		return fmt.Errorf("graph %q has a cycle: nodes %s depend on each other", g.Proto.GetName(), strings.Join(stuck, ", "))
	}
	copy(g.Proto.Node, order)
	g.renumber()
	for _, sg := range g.Subgraphs {
		if err := sg.Toposort(); err != nil {
			return err
		}
	}
	return nil
}

// nodeReads returns a node's inputs plus the outer values its subgraphs read.
func (g *Graph) nodeReads(n *onnxpb.NodeProto) []string {
	reads := append([]string(nil), n.Input...)
	for _, sg := range g.Subgraphs {
		if sg.Owner != n {
			continue
		}
		var captured []string
		for name := range sg.outerReads() {
			captured = append(captured, name)
		}
		sort.Strings(captured)
		reads = append(reads, captured...)
	}
	return reads
}

func nodeLabel(n *onnxpb.NodeProto) string {
	if n.GetName() != "" {
		return strconv.Quote(n.GetName())
	}
	return fmt.Sprintf("%s(-> %s)", n.GetOpType(), strings.Join(n.Output, ","))
}

// minHeap is a min-heap of node positions for container/heap.
type minHeap struct{ a []int }

func (h *minHeap) Len() int           { return len(h.a) }
func (h *minHeap) Less(i, j int) bool { return h.a[i] < h.a[j] }
func (h *minHeap) Swap(i, j int)      { h.a[i], h.a[j] = h.a[j], h.a[i] }
func (h *minHeap) Push(x any)         { h.a = append(h.a, x.(int)) }
func (h *minHeap) Pop() any {
	x := h.a[len(h.a)-1]
	h.a = h.a[:len(h.a)-1]
	return x
}
