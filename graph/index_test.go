package graph

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// freeNames returns the names graph g reads (in node inputs, its outputs,
// or nested subgraphs) without defining them itself. It is written from
// the ONNX scoping rules, independently of Graph's index.
func freeNames(g *onnxpb.GraphProto) map[string]bool {
	defined := map[string]bool{}
	for _, t := range g.Initializer {
		defined[t.GetName()] = true
	}
	for _, st := range g.SparseInitializer {
		defined[st.GetValues().GetName()] = true
	}
	for _, vi := range g.Input {
		defined[vi.GetName()] = true
	}
	for _, n := range g.Node {
		for _, o := range n.Output {
			defined[o] = true
		}
	}
	free := map[string]bool{}
	use := func(name string) {
		if name != "" && !defined[name] {
			free[name] = true
		}
	}
	for _, n := range g.Node {
		for _, in := range n.Input {
			use(in)
		}
		for _, sub := range nodeSubgraphs(n) {
			for name := range freeNames(sub) {
				use(name)
			}
		}
	}
	for _, vi := range g.Output {
		use(vi.GetName())
	}
	return free
}

// checkSorted verifies that every node of g (and of its subgraphs) comes
// after the producers of everything it reads; outer holds the names
// available from enclosing scopes at the owner node.
func checkSorted(t *testing.T, g *onnxpb.GraphProto, outer map[string]bool) {
	t.Helper()
	avail := map[string]bool{"": true}
	for name := range outer {
		avail[name] = true
	}
	for _, x := range g.Initializer {
		avail[x.GetName()] = true
	}
	for _, st := range g.SparseInitializer {
		avail[st.GetValues().GetName()] = true
	}
	for _, vi := range g.Input {
		avail[vi.GetName()] = true
	}
	for i, n := range g.Node {
		reads := append([]string(nil), n.Input...)
		for _, sub := range nodeSubgraphs(n) {
			for name := range freeNames(sub) {
				reads = append(reads, name)
			}
		}
		for _, in := range reads {
			if !avail[in] {
				t.Fatalf("graph %q: node %d %s reads %q before it is produced", g.GetName(), i, nodeLabel(n), in)
			}
		}
		for _, sub := range nodeSubgraphs(n) {
			checkSorted(t, sub, avail)
		}
		for _, o := range n.Output {
			avail[o] = true
		}
	}
}

// isSorted reports whether the top level of g is sorted (as checkSorted
// checks it, without failing).
func isSorted(g *onnxpb.GraphProto) bool {
	ok := true
	avail := map[string]bool{"": true}
	for _, x := range g.Initializer {
		avail[x.GetName()] = true
	}
	for _, vi := range g.Input {
		avail[vi.GetName()] = true
	}
	for _, n := range g.Node {
		for _, in := range n.Input {
			if !avail[in] {
				ok = false
			}
		}
		for _, sub := range nodeSubgraphs(n) {
			for name := range freeNames(sub) {
				if !avail[name] {
					ok = false
				}
			}
		}
		for _, o := range n.Output {
			avail[o] = true
		}
	}
	return ok
}

func nodeNames(nodes []*onnxpb.NodeProto) []string {
	var names []string
	for _, n := range nodes {
		names = append(names, n.GetName())
	}
	return names
}

// nestedModel: W and B are initializers of the main graph; a Loop's body
// reads W (a capture) and holds an If whose branch reads h, a value of the
// main graph, two scopes up; the body also defines its own "B" input that
// shadows the outer B.
func nestedModel() *onnxpb.GraphProto {
	thenBranch := &onnxpb.GraphProto{
		Name:   proto.String("then"),
		Node:   []*onnxpb.NodeProto{node("inner_add", "Add", []string{"h", "bw"}, []string{"t"})},
		Output: []*onnxpb.ValueInfoProto{valueInfo("t")},
	}
	elseBranch := &onnxpb.GraphProto{
		Name:   proto.String("else"),
		Output: []*onnxpb.ValueInfoProto{valueInfo("a")}, // an outer value returned as is
	}
	body := &onnxpb.GraphProto{
		Name:  proto.String("body"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("iter"), valueInfo("cond_in"), valueInfo("B")},
		Node: []*onnxpb.NodeProto{
			node("body_mm", "MatMul", []string{"B", "W"}, []string{"bw"}),
			node("body_if", "If", []string{"cond_in"}, []string{"r"}, graphAttr("then_branch", thenBranch), graphAttr("else_branch", elseBranch)),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("cond_in"), valueInfo("r")},
	}
	return &onnxpb.GraphProto{
		Name:  proto.String("main"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("x"), valueInfo("n"), valueInfo("c")},
		Initializer: []*onnxpb.TensorProto{
			rawTensor("W", Float, []int64{2, 2}, le32f(1, 2, 3, 4)),
			rawTensor("B", Float, []int64{2}, le32f(1, 2)),
			rawTensor("unused", Float, []int64{1}, le32f(0)),
		},
		Node: []*onnxpb.NodeProto{
			node("A", "Relu", []string{"x"}, []string{"a"}),
			node("H", "Add", []string{"a", "B"}, []string{"h"}),
			node("loop", "Loop", []string{"n", "c", "x"}, []string{"out"}, graphAttr("body", body)),
		},
		Output: []*onnxpb.ValueInfoProto{valueInfo("out")},
	}
}

func TestGraphIndex(t *testing.T) {
	gp := nestedModel()
	g := NewGraph(gp)
	loop := gp.Node[2]
	if p := g.Producer("h"); p != gp.Node[1] {
		t.Errorf("Producer(h) = %v", p)
	}
	if p := g.Producer("x"); p != nil {
		t.Errorf("Producer(x) = %v, want nil for a graph input", p)
	}
	// The Loop reads W, h and a only through its body: it is their consumer.
	for name, want := range map[string][]string{
		"x": {"A", "loop"}, "a": {"H", "loop"}, "B": {"H"}, "W": {"loop"}, "h": {"loop"}, "unused": nil,
	} {
		if got := nodeNames(g.Consumers(name)); !slices.Equal(got, want) {
			t.Errorf("Consumers(%s) = %v, want %v", name, got, want)
		}
	}
	if len(g.Subgraphs) != 1 || g.Subgraphs[0].Owner != loop || g.Subgraphs[0].Parent != g {
		t.Fatalf("subgraphs: %+v", g.Subgraphs)
	}
	body := g.Subgraphs[0]
	if len(body.Subgraphs) != 2 {
		t.Fatalf("body has %d subgraphs", len(body.Subgraphs))
	}
	for name, want := range map[string][]string{"W": {"body_mm"}, "h": {"body_if"}, "a": {"body_if"}, "bw": {"body_if"}, "B": {"body_mm"}} {
		if got := nodeNames(body.Consumers(name)); !slices.Equal(got, want) {
			t.Errorf("body: Consumers(%s) = %v, want %v", name, got, want)
		}
	}
	// Initializer lookups see through scopes, but not past a shadowing input.
	if w, s := body.Initializer("W"); w != gp.Initializer[0] || s != g {
		t.Errorf("body.Initializer(W) = %v, %v", w, s)
	}
	if b, _ := body.Initializer("B"); b != nil {
		t.Error("body.Initializer(B) found the outer B through the body's own input B")
	}
	if w, _, s := body.Subgraphs[0].ConstantTensor("W"); w == nil || s != g {
		t.Error("then branch cannot see W two scopes up")
	}
	var walked []string
	g.Walk(func(s *Graph) { walked = append(walked, s.Proto.GetName()) })
	if strings.Join(walked, ",") != "main,body,then,else" {
		t.Errorf("Walk order %v", walked)
	}
	if !g.IsGraphInput("x") || g.IsGraphInput("a") || !g.IsGraphOutput("out") || g.IsGraphOutput("a") {
		t.Error("IsGraphInput/IsGraphOutput")
	}
}

func TestOverridableInitializer(t *testing.T) {
	gp := &onnxpb.GraphProto{
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x"), valueInfo("W")},
		Initializer: []*onnxpb.TensorProto{rawTensor("W", Float, []int64{1}, le32f(1)), rawTensor("V", Float, []int64{1}, le32f(1))},
		Node: []*onnxpb.NodeProto{
			node("m", "Mul", []string{"x", "W"}, []string{"y"}),
			node("k", "Constant", nil, []string{"K"}, &onnxpb.AttributeProto{Name: proto.String("value_floats"), Type: onnxpb.AttributeProto_FLOATS.Enum(), Floats: []float32{1, 2}}),
		},
	}
	mp := newModelProto(gp)
	g := NewModel(mp, "").Graph()
	if !g.IsOverridableInitializer("W") || g.IsOverridableInitializer("V") {
		t.Error("IsOverridableInitializer")
	}
	if w, _, _ := g.ConstantTensor("W"); w != nil {
		t.Error("an initializer that is also a graph input is not a constant")
	}
	if v, _, _ := g.ConstantTensor("V"); v == nil {
		t.Error("V is a constant")
	}
	k, c, _ := g.ConstantTensor("K")
	if k == nil || c != gp.Node[1] || !slices.Equal(k.FloatData, []float32{1, 2}) || !slices.Equal(k.Dims, []int64{2}) {
		t.Errorf("Constant value_floats: %v %v", k, c)
	}
	// Before IR version 4 every initializer is listed as an input too:
	// they are still constants.
	mp.IrVersion = proto.Int64(3)
	if w, _, _ := NewModel(mp, "").Graph().ConstantTensor("W"); w == nil {
		t.Error("IR 3: W is a constant")
	}
}

func TestUniqueName(t *testing.T) {
	gp := nestedModel()
	g := NewGraph(gp)
	body := g.Subgraphs[0]
	// Names from every scope are taken: "t" is an output inside the then
	// branch, "body_mm" a node name in the body, "iter" a body input.
	for _, name := range []string{"t", "body_mm", "iter", "W", "x", "loop", "out"} {
		if !g.IsUsed(name) {
			t.Errorf("%s not seen as used", name)
		}
	}
	if got := g.UniqueName("t"); got != "t_1" {
		t.Errorf("UniqueName(t) = %q", got)
	}
	if got := body.UniqueName("t"); got != "t_2" {
		t.Errorf("UniqueName(t) from the body = %q, want t_2 (t_1 was handed out)", got)
	}
	if got := g.UniqueName("fresh"); got != "fresh" {
		t.Errorf("UniqueName(fresh) = %q", got)
	}
	if got := body.Subgraphs[1].UniqueName("fresh"); got != "fresh_1" {
		t.Errorf("second UniqueName(fresh) = %q", got)
	}
	// Reindexing the model does not forget names handed out.
	g.Reindex()
	if got := g.UniqueName("fresh"); got == "fresh" || got == "fresh_1" {
		t.Errorf("after Reindex UniqueName(fresh) = %q", got)
	}
}

func TestEdits(t *testing.T) {
	gp := nestedModel()
	g := NewGraph(gp)
	loop := gp.Node[2]

	// InsertNodesAfter puts nodes right after the anchor, in order.
	s1 := node("S1", "Sigmoid", []string{"a"}, []string{"s1"})
	s2 := node("S2", "Neg", []string{"s1"}, []string{"s2"})
	if err := g.InsertNodesAfter(gp.Node[0], s1, s2); err != nil {
		t.Fatal(err)
	}
	if got := nodeNames(gp.Node); strings.Join(got, ",") != "A,S1,S2,H,loop" {
		t.Fatalf("order after insert: %v", got)
	}
	if g.Producer("s2") != s2 || !slices.Contains(g.Consumers("a"), s1) {
		t.Fatal("inserted nodes not indexed")
	}
	if err := g.InsertNodesAfter(node("ghost", "Relu", nil, nil), s1); err == nil {
		t.Error("InsertNodesAfter a node not in the graph succeeded")
	}

	// ReplaceUses: every reader of a, also inside the Loop body's If (which
	// returns a as its else output), now reads s2; S1 is kept on a.
	g.ReplaceUses("a", "s2", false, s1)
	if gp.Node[3].Input[0] != "s2" || s1.Input[0] != "a" {
		t.Fatalf("inputs after ReplaceUses: H %v S1 %v", gp.Node[3].Input, s1.Input)
	}
	elseOut := loop.Attribute[0].G.Node[1].Attribute[1].G.Output[0].GetName()
	if elseOut != "s2" {
		t.Errorf("captured output in the else branch is %q, want s2", elseOut)
	}
	if got := nodeNames(g.Consumers("a")); strings.Join(got, ",") != "S1" {
		t.Errorf("Consumers(a) = %v", got)
	}
	if got := nodeNames(g.Consumers("s2")); strings.Join(got, ",") != "H,loop" {
		t.Errorf("Consumers(s2) = %v", got)
	}
	body := g.Subgraphs[0]
	if got := nodeNames(body.Consumers("s2")); strings.Join(got, ",") != "body_if" {
		t.Errorf("body: Consumers(s2) = %v", got)
	}
	// A graph output is renamed unless kept.
	g.ReplaceUses("out", "x", true)
	if !g.IsGraphOutput("out") {
		t.Error("keepOutputs renamed the output")
	}

	// A node holding a subgraph added later is indexed with its captures.
	ifBody := &onnxpb.GraphProto{Name: proto.String("late"), Node: []*onnxpb.NodeProto{node("late_mul", "Mul", []string{"h", "unused"}, []string{"lm"})}, Output: []*onnxpb.ValueInfoProto{valueInfo("lm")}}
	late := node("late_if", "If", []string{"c"}, []string{"late_out"}, graphAttr("then_branch", ifBody), graphAttr("else_branch", ifBody))
	g.AddNode(late)
	if !slices.Contains(g.Consumers("unused"), late) || !slices.Contains(g.Consumers("h"), late) {
		t.Fatalf("AddNode: captures of the new If not indexed: %v", nodeNames(g.Consumers("unused")))
	}
	if len(g.Subgraphs) != 3 {
		t.Fatalf("AddNode: %d subgraphs indexed", len(g.Subgraphs))
	}
	// RemoveNode forgets it again, captures included.
	if err := g.RemoveNode(late); err != nil {
		t.Fatal(err)
	}
	if len(g.Consumers("unused")) != 0 || slices.Contains(g.Consumers("h"), late) || len(g.Subgraphs) != 1 {
		t.Fatalf("RemoveNode left captures indexed: %v", nodeNames(g.Consumers("unused")))
	}
	if err := g.RemoveNode(late); err == nil {
		t.Error("removing a node twice succeeded")
	}

	// Cleanup: a chain read by nobody goes, and so does the unused
	// initializer; W stays, read only inside the Loop body.
	g.AddNode(node("dead2", "Relu", []string{"dead1_out"}, []string{"dead2_out"}))
	g.AddNode(node("dead1", "Relu", []string{"unused"}, []string{"dead1_out"}))
	g.AddNode(node("D1", "Relu", []string{"x"}, []string{"d1"}))
	g.AddNode(node("D2", "Relu", []string{"d1"}, []string{"d2"}))
	sink := node("sink", "Print", []string{"d2"}, nil) // no outputs: kept, keeps D1 and D2
	g.AddNode(sink)
	g.Cleanup()
	if got := nodeNames(gp.Node); strings.Join(got, ",") != "A,S1,S2,H,loop,D1,D2,sink" {
		t.Errorf("nodes after Cleanup: %v", got)
	}
	var inits []string
	for _, x := range gp.Initializer {
		inits = append(inits, x.GetName())
	}
	if strings.Join(inits, ",") != "W,B" {
		t.Errorf("initializers after Cleanup: %v", inits)
	}
	if err := g.RemoveNode(sink); err != nil { // now D1 and D2 are dead
		t.Fatal(err)
	}
	g.Cleanup()
	if got := nodeNames(gp.Node); strings.Join(got, ",") != "A,S1,S2,H,loop" {
		t.Errorf("nodes after second Cleanup: %v", got)
	}

	// A fresh index of the edited graph agrees with the maintained one.
	fresh := NewGraph(gp)
	for _, name := range []string{"x", "a", "s2", "h", "W", "B", "out", "d1"} {
		if got, want := nodeNames(g.Consumers(name)), nodeNames(fresh.Consumers(name)); !slices.Equal(got, want) {
			t.Errorf("Consumers(%s) = %v, a fresh index says %v", name, got, want)
		}
		if g.Producer(name) != fresh.Producer(name) {
			t.Errorf("Producer(%s) differs from a fresh index", name)
		}
	}
}

func TestSetInputAndInitializers(t *testing.T) {
	gp := nestedModel()
	g := NewGraph(gp)
	h := gp.Node[1]
	g.SetInput(h, 1, "W")
	if slices.Contains(g.Consumers("B"), h) || !slices.Contains(g.Consumers("W"), h) {
		t.Error("SetInput did not move the consumer")
	}
	// The Loop reads x as an input and nothing else: changing that input
	// drops it from x's consumers, but changing an input of a node that
	// also captures the old value keeps it.
	loop := gp.Node[2]
	g.SetInput(loop, 0, "h") // loop reads h through its body too
	g.SetInput(loop, 0, "n")
	if !slices.Contains(g.Consumers("h"), loop) {
		t.Error("SetInput dropped a consumer that still reads the value through its subgraph")
	}
	g.AddInitializer(rawTensor("extra", Float, []int64{1}, le32f(5)))
	if x, _ := g.Initializer("extra"); x == nil || !g.IsUsed("extra") {
		t.Error("AddInitializer")
	}
	gp.Input = append(gp.Input, valueInfo("extra"))
	g.Reindex()
	if !g.RemoveInitializer("extra") || g.IsGraphInput("extra") || len(gp.Input) != 3 {
		t.Error("RemoveInitializer did not remove the initializer and its input")
	}
	if g.RemoveInitializer("extra") {
		t.Error("RemoveInitializer of a missing name reported true")
	}
}

// randomDAG builds a random DAG of n nodes: node i reads x or outputs of
// earlier nodes, so the listed order is sorted.
func randomDAG(r *rand.Rand, n int) *onnxpb.GraphProto {
	gp := &onnxpb.GraphProto{
		Name:        proto.String("dag"),
		Input:       []*onnxpb.ValueInfoProto{valueInfo("x")},
		Initializer: []*onnxpb.TensorProto{rawTensor("w", Float, []int64{1}, le32f(1))},
	}
	for i := 0; i < n; i++ {
		var ins []string
		for k := 0; k < 1+r.Intn(3); k++ {
			switch j := r.Intn(i + 2); {
			case j == i:
				ins = append(ins, "x")
			case j == i+1:
				ins = append(ins, "w")
			default:
				ins = append(ins, fmt.Sprintf("v%d", j))
			}
		}
		gp.Node = append(gp.Node, node(fmt.Sprintf("n%d", i), "Sum", ins, []string{fmt.Sprintf("v%d", i)}))
	}
	gp.Output = []*onnxpb.ValueInfoProto{valueInfo(fmt.Sprintf("v%d", n-1))}
	return gp
}

func TestToposortShuffled(t *testing.T) {
	r := rand.New(rand.NewSource(3))
	for trial := 0; trial < 50; trial++ {
		gp := randomDAG(r, 5+r.Intn(60))
		want := nodeNames(gp.Node)
		// Sorting a sorted graph changes nothing.
		if err := NewGraph(gp).Toposort(); err != nil {
			t.Fatal(err)
		}
		if got := nodeNames(gp.Node); !slices.Equal(got, want) {
			t.Fatalf("Toposort reordered a sorted graph: %v -> %v", want, got)
		}
		r.Shuffle(len(gp.Node), func(i, j int) { gp.Node[i], gp.Node[j] = gp.Node[j], gp.Node[i] })
		if err := NewGraph(gp).Toposort(); err != nil {
			t.Fatal(err)
		}
		checkSorted(t, gp, nil)
		got := nodeNames(gp.Node)
		slices.Sort(got)
		w := slices.Clone(want)
		slices.Sort(w)
		if !slices.Equal(got, w) {
			t.Fatalf("Toposort lost or duplicated nodes")
		}
	}
}

func TestToposortSubgraphCapture(t *testing.T) {
	// The Loop body reads h; put the Loop before h's producer. Toposort
	// must move it after, although no Loop input names h.
	gp := nestedModel()
	gp.Node = []*onnxpb.NodeProto{gp.Node[2], gp.Node[1], gp.Node[0]}
	g := NewGraph(gp)
	if err := g.Toposort(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(nodeNames(gp.Node), ","); got != "A,H,loop" {
		t.Fatalf("order %s", got)
	}
	checkSorted(t, gp, nil)
	// Subgraphs are sorted too.
	body := gp.Node[2].Attribute[0].G
	body.Node[0], body.Node[1] = body.Node[1], body.Node[0]
	if err := NewGraph(gp).Toposort(); err != nil {
		t.Fatal(err)
	}
	if body.Node[0].GetName() != "body_mm" {
		t.Fatalf("body not sorted: %v", nodeNames(body.Node))
	}
}

func TestToposortCycle(t *testing.T) {
	gp := &onnxpb.GraphProto{
		Name:  proto.String("cyclic"),
		Input: []*onnxpb.ValueInfoProto{valueInfo("x")},
		Node: []*onnxpb.NodeProto{
			node("ok", "Relu", []string{"x"}, []string{"r"}),
			node("P", "Add", []string{"r", "q"}, []string{"p"}),
			node("Q", "Relu", []string{"p"}, []string{"q"}),
			node("after", "Relu", []string{"q"}, []string{"y"}),
		},
	}
	err := NewGraph(gp).Toposort()
	if err == nil {
		t.Fatal("Toposort accepted a cycle")
	}
	msg := err.Error()
	if !strings.Contains(msg, "cycle") || !strings.Contains(msg, `"P"`) || !strings.Contains(msg, `"Q"`) || !strings.Contains(msg, "cyclic") {
		t.Errorf("error %q does not name the graph and the nodes on the cycle", msg)
	}
	if strings.Contains(msg, `"ok"`) || strings.Contains(msg, `"after"`) {
		t.Errorf("error %q names nodes that are not on the cycle", msg)
	}
	gp.Node = []*onnxpb.NodeProto{node("", "Add", []string{"x", "s"}, []string{"s"})}
	err = NewGraph(gp).Toposort()
	if err == nil || !strings.Contains(err.Error(), "own output") || !strings.Contains(err.Error(), "Add(-> s)") {
		t.Errorf("self loop: %v", err)
	}
	// ResolveWeight on a cycle of Identity nodes ends.
	gp.Node = []*onnxpb.NodeProto{node("i1", "Identity", []string{"b"}, []string{"a"}), node("i2", "Identity", []string{"a"}, []string{"b"})}
	if w := NewGraph(gp).ResolveWeight("a"); w != nil {
		t.Error("ResolveWeight through a cycle found a weight")
	}
}

// unsortedCorpus are the corpus models whose exporters wrote nodes out of
// order.
var unsortedCorpus = []string{"gpt2-conv1d-gemm-pytorch16.onnx", "bert-toy-tied-embeddings.onnx", "llama-tiny-fp16-extdata/model.onnx"}

func TestToposortCorpus(t *testing.T) {
	for _, name := range unsortedCorpus {
		t.Run(name, func(t *testing.T) {
			m := mustLoad(t, corpusPath(t, name))
			gp := m.Proto.Graph
			if isSorted(gp) {
				t.Fatal("expected this corpus model to be unsorted")
			}
			before := len(gp.Node)
			if err := m.Graph().Toposort(); err != nil {
				t.Fatal(err)
			}
			if len(gp.Node) != before {
				t.Fatalf("%d nodes, had %d", len(gp.Node), before)
			}
			checkSorted(t, gp, nil)
		})
	}
}

func TestToposortKeepsSortedModels(t *testing.T) {
	// Every sorted model in the corpus and libonnx-testdata keeps its order.
	var paths []string
	if _, err := os.Stat(corpusDir); err == nil {
		filepath.WalkDir(corpusDir, func(p string, d os.DirEntry, err error) error {
			if err == nil && strings.HasSuffix(p, ".onnx") && !strings.Contains(p, "bad-") {
				paths = append(paths, p)
			}
			return nil
		})
	}
	filepath.WalkDir(libonnxDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Name() == "model.onnx" {
			paths = append(paths, p)
		}
		return nil
	})
	if len(paths) == 0 {
		t.Skip("skipping: neither the shared corpus nor libonnx-testdata is installed")
	}
	checked := 0
	for _, p := range paths {
		m, err := Load(p)
		if err != nil {
			t.Fatal(err)
		}
		if !isSorted(m.Proto.Graph) {
			continue
		}
		before := proto.Clone(m.Proto)
		if err := m.Graph().Toposort(); err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		if !proto.Equal(before, m.Proto) {
			t.Errorf("%s: Toposort changed a sorted model", p)
		}
		checked++
	}
	t.Logf("%d sorted models kept their order", checked)
}

// TestManyEdits applies thousands of random inserts and removals to a large
// graph and checks, against a plain slice edited the same way, the node
// order, every position the index reports, and the producer/consumer index
// against a fresh one.
func TestManyEdits(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	gp := randomDAG(r, 3000)
	g := NewGraph(gp)
	ref := slices.Clone(gp.Node)
	readers := map[string]int{} // value -> nodes reading it, kept by hand
	for _, n := range gp.Node {
		for _, in := range n.Input {
			readers[in]++
		}
	}
	var removed []*onnxpb.NodeProto
	checkAll := func(step int) {
		t.Helper()
		for i, n := range ref {
			if got := g.nodeIndex(n); got != i {
				t.Fatalf("step %d: node %s at %d, index says %d", step, n.GetName(), i, got)
			}
		}
		for _, n := range removed {
			if got := g.nodeIndex(n); got != -1 {
				t.Fatalf("step %d: removed node %s found at %d", step, n.GetName(), got)
			}
		}
		fresh := NewGraph(gp)
		for _, n := range ref {
			for _, v := range append(slices.Clone(n.Input), n.Output...) {
				if g.Producer(v) != fresh.Producer(v) {
					t.Fatalf("step %d: Producer(%s) differs from a fresh index", step, v)
				}
				got, want := nodeNames(g.Consumers(v)), nodeNames(fresh.Consumers(v))
				slices.Sort(got)
				slices.Sort(want)
				if !slices.Equal(got, want) {
					t.Fatalf("step %d: Consumers(%s) = %v, a fresh index says %v", step, v, got, want)
				}
			}
		}
		checkSorted(t, gp, nil)
	}
	added := 0
	for step := 0; step < 4000; step++ {
		i := r.Intn(len(ref))
		at := ref[i]
		if out := at.Output[0]; r.Intn(2) == 0 && readers[out] == 0 && !g.IsGraphOutput(out) {
			if err := g.RemoveNode(at); err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			ref = slices.Delete(ref, i, i+1)
			for _, in := range at.Input {
				readers[in]--
			}
			removed = append(removed, at)
		} else {
			// New nodes read the anchor's output, so the order stays valid.
			var nodes []*onnxpb.NodeProto
			prev := at.Output[0]
			for k := 0; k < 1+r.Intn(3); k++ {
				out := fmt.Sprintf("e%d", added)
				nodes = append(nodes, node(fmt.Sprintf("edit%d", added), "Relu", []string{prev}, []string{out}))
				readers[prev]++
				prev = out
				added++
			}
			if err := g.InsertNodesAfter(at, nodes...); err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			ref = slices.Insert(ref, i+1, nodes...)
		}
		if !slices.Equal(gp.Node, ref) {
			t.Fatalf("step %d: node order differs from the reference", step)
		}
		for k := 0; k < 8; k++ {
			j := r.Intn(len(ref))
			if got := g.nodeIndex(ref[j]); got != j {
				t.Fatalf("step %d: node %s at %d, index says %d", step, ref[j].GetName(), j, got)
			}
		}
		if step%500 == 499 {
			checkAll(step)
		}
	}
	if len(removed) < 500 || added < 2000 {
		t.Fatalf("the walk made too few edits to mean much: %d removals, %d inserts", len(removed), added)
	}
	// Toposort keeps a sorted graph as it is, and positions stay right.
	if err := g.Toposort(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gp.Node, ref) {
		t.Fatal("Toposort reordered a sorted graph")
	}
	checkAll(-1)

	// The shift log answered every lookup: none fell back to a rescan.
	if g.rescans != 0 {
		t.Errorf("%d lookups fell back to renumbering the nodes", g.rescans)
	}

	// Nodes appended to Proto.Node behind the index's back are still found.
	direct := node("direct", "Relu", []string{"x"}, []string{"direct_out"})
	gp.Node = append(gp.Node, direct)
	if got := g.nodeIndex(direct); got != len(gp.Node)-1 || g.rescans != 1 {
		t.Fatalf("directly appended node at %d after %d rescans, want %d after 1", got, g.rescans, len(gp.Node)-1)
	}
}
