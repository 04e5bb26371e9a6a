package graph

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// roundTrip loads path, saves it into a fresh folder with default options
// and returns the loaded model, the saved path and the saved bytes.
func roundTrip(t *testing.T, path string) (*Model, string, []byte) {
	t.Helper()
	m := mustLoad(t, path)
	out := filepath.Join(t.TempDir(), filepath.Base(path))
	if err := m.Save(out, SaveOptions{}); err != nil {
		t.Fatalf("Save: %v", err)
	}
	saved, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return m, out, saved
}

func libonnxModels(t *testing.T) []string {
	t.Helper()
	var paths []string
	filepath.WalkDir(libonnxDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() == "model.onnx" {
			paths = append(paths, p)
		}
		return nil
	})
	if len(paths) == 0 {
		t.Skipf("skipping: no model.onnx under %s; apt-get install libonnx-testdata to run this test", libonnxDir)
	}
	sort.Strings(paths)
	return paths
}

func TestRoundTripLibonnxTestdata(t *testing.T) {
	paths := libonnxModels(t)
	identical := 0
	tmp := t.TempDir()
	for _, p := range paths {
		name := strings.TrimPrefix(p, libonnxDir+"/")
		orig, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		m, err := Load(p)
		if err != nil {
			t.Errorf("Load: %v", err)
			continue
		}
		before := proto.Clone(m.Proto)
		out := filepath.Join(tmp, "model.onnx")
		if err := m.Save(out, SaveOptions{}); err != nil {
			t.Errorf("%s: Save: %v", name, err)
			continue
		}
		if !proto.Equal(before, m.Proto) {
			t.Errorf("%s: Save changed the in-memory model", name)
		}
		saved, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		back := &onnxpb.ModelProto{}
		if err := proto.Unmarshal(saved, back); err != nil {
			t.Errorf("%s: saved bytes do not parse: %v", name, err)
			continue
		}
		origMP := &onnxpb.ModelProto{}
		if err := proto.Unmarshal(orig, origMP); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(origMP, back) {
			t.Errorf("%s: saved model is not proto-equal to the original", name)
			continue
		}
		if bytes.Equal(orig, saved) {
			identical++
		} else if !bytes.Equal(saved, mustMarshal(t, origMP)) {
			// A difference may only come from the original writer's
			// encoding (field order, packing), never from Save.
			t.Errorf("%s: saved bytes are not the canonical encoding of the original", name)
		} else {
			t.Logf("%s: original writer's encoding differs from the canonical one", name)
		}
	}
	t.Logf("%d of %d models saved byte-identical to the original file", identical, len(paths))
}

func TestRoundTripLibonnxExternal(t *testing.T) {
	// Every tensor with a fixed element size goes to the data file (typed
	// fields are converted to raw bytes on the way); loading the result
	// gives back the same model and the same bytes for every tensor.
	if testing.Short() {
		t.Skip("skipping in short mode")
	}
	paths := libonnxModels(t)
	tmp := t.TempDir()
	external := 0
	for _, p := range paths {
		m, err := Load(p)
		if err != nil {
			t.Errorf("Load: %v", err)
			continue
		}
		out := filepath.Join(tmp, "model.onnx")
		if err := m.Save(out, SaveOptions{External: ExternalAlways, Threshold: 1, Align: 64}); err != nil {
			t.Errorf("%s: Save: %v", p, err)
			continue
		}
		back, err := Load(out)
		if err != nil {
			t.Errorf("%s: Load of saved: %v", p, err)
			continue
		}
		if back.hasExternal() {
			external++
		}
		sameData(t, m, back)
		back.Close()
		os.Remove(out + ".data")
	}
	if external == 0 {
		t.Error("no model had a tensor written to external data")
	}
	t.Logf("%d of %d models saved with external data", external, len(paths))
}

// corpusModels lists every .onnx file in the shared corpus, skipping the test
// when the corpus is absent.
func corpusModels(t *testing.T) []string {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(corpusDir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".onnx") {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil || len(paths) == 0 {
		t.Skipf("skipping: shared corpus not found at %s (%v); it lives in ../shared/corpus beside the repository", corpusDir, err)
	}
	sort.Strings(paths)
	return paths
}

func TestRoundTripCorpus(t *testing.T) {
	identical, total := 0, 0
	for _, p := range corpusModels(t) {
		name := strings.TrimPrefix(filepath.ToSlash(p), corpusDir+"/")
		if strings.HasPrefix(name, "bad-") {
			continue // TestLoadCorpusPathTraversal checks these fail to load
		}
		t.Run(name, func(t *testing.T) {
			orig, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			m, out, saved := roundTrip(t, p)
			back := &onnxpb.ModelProto{}
			if err := proto.Unmarshal(saved, back); err != nil {
				t.Fatalf("saved bytes do not parse: %v", err)
			}
			if m.hasExternal() {
				// Offsets and the data file's name change; the data not.
				sameData(t, m, mustLoad(t, out))
				return
			}
			origMP := &onnxpb.ModelProto{}
			if err := proto.Unmarshal(orig, origMP); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(origMP, back) {
				t.Fatalf("saved model is not proto-equal to the original")
			}
			total++
			if bytes.Equal(orig, saved) {
				identical++
			} else if !bytes.Equal(saved, mustMarshal(t, origMP)) {
				t.Fatalf("saved bytes are not the canonical encoding of the original")
			}
		})
	}
	t.Logf("%d of %d corpus models without external data saved byte-identical", identical, total)
}

// addUnknown appends fields this schema does not know to a message, as a
// newer ONNX version would write them.
func addUnknown(m proto.Message, num protowire.Number, kind string) {
	r := m.ProtoReflect()
	b := r.GetUnknown()
	switch kind {
	case "varint":
		b = protowire.AppendTag(b, num, protowire.VarintType)
		b = protowire.AppendVarint(b, 1<<40+7)
	case "bytes":
		b = protowire.AppendTag(b, num, protowire.BytesType)
		b = protowire.AppendString(b, "from a newer ONNX")
	case "fixed32":
		b = protowire.AppendTag(b, num, protowire.Fixed32Type)
		b = protowire.AppendFixed32(b, 0xdeadbeef)
	case "fixed64":
		b = protowire.AppendTag(b, num, protowire.Fixed64Type)
		b = protowire.AppendFixed64(b, 0x0123456789abcdef)
	case "message":
		// A nested message of its own unknown fields.
		var inner []byte
		inner = protowire.AppendTag(inner, 1, protowire.VarintType)
		inner = protowire.AppendVarint(inner, 3)
		inner = protowire.AppendTag(inner, 2, protowire.BytesType)
		inner = protowire.AppendString(inner, "nested")
		b = protowire.AppendTag(b, num, protowire.BytesType)
		b = protowire.AppendBytes(b, inner)
	}
	r.SetUnknown(b)
}

func TestUnknownFieldsSurvive(t *testing.T) {
	mp := mixedModel()
	g := mp.Graph
	addUnknown(mp, 99, "varint")
	addUnknown(mp, 100, "message")
	addUnknown(g, 99, "bytes")
	addUnknown(g.Node[1], 99, "fixed32")
	addUnknown(g.Node[1], 98, "varint")
	addUnknown(g.Initializer[0], 99, "fixed64")
	addUnknown(g.Initializer[2], 99, "bytes")
	addUnknown(g.Input[0], 99, "varint")
	addUnknown(mp.OpsetImport[0], 99, "varint")
	ifNode := g.Node[2]
	addUnknown(ifNode.Attribute[0], 99, "bytes")
	then := ifNode.Attribute[0].G
	addUnknown(then, 99, "varint")
	addUnknown(then.Node[0], 99, "bytes")
	addUnknown(then.Initializer[0], 99, "message")
	addUnknown(g.Node[0].Attribute[0].T, 99, "varint") // a Constant's tensor
	orig := mustMarshal(t, mp)

	dir := t.TempDir()
	path := filepath.Join(dir, "model.onnx")
	if err := os.WriteFile(path, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	m := mustLoad(t, path)
	// The unknown fields are really kept in the loaded messages.
	for _, msg := range []proto.Message{m.Proto, m.Proto.Graph, m.Proto.Graph.Node[1], m.Proto.Graph.Initializer[0], Attr(m.Proto.Graph.Node[2], "then_branch").G.Initializer[0]} {
		if len(msg.ProtoReflect().GetUnknown()) == 0 {
			t.Fatalf("%T lost its unknown fields on Load", msg)
		}
	}
	out := filepath.Join(dir, "saved.onnx")
	if err := m.Save(out, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	saved, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(orig, saved) {
		t.Fatalf("saved model is not byte-identical: %d bytes, original %d", len(saved), len(orig))
	}

	// With external data the unknown fields of the tensors that move to
	// the data file survive too.
	ext := filepath.Join(dir, "ext.onnx")
	if err := m.Save(ext, SaveOptions{External: ExternalAlways}); err != nil {
		t.Fatal(err)
	}
	em := mustLoad(t, ext)
	if !IsExternal(em.Proto.Graph.Initializer[0]) {
		t.Fatal("big.weight not external")
	}
	if !bytes.Equal(em.Proto.Graph.Initializer[0].ProtoReflect().GetUnknown(), m.Proto.Graph.Initializer[0].ProtoReflect().GetUnknown()) {
		t.Fatal("an external tensor lost its unknown fields")
	}
	sameData(t, m, em)
}

func TestUnknownEnumValueSurvives(t *testing.T) {
	// An attribute type from a newer ONNX is a value the AttributeType enum
	// does not list. It must survive a round trip, in place.
	mp := tinyModel()
	// Written in field order (name 1, type 20, ref_attr_name 21) as any
	// protobuf library writes it.
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendString(b, "future")
	b = protowire.AppendTag(b, 20, protowire.VarintType)
	b = protowire.AppendVarint(b, 77)
	b = protowire.AppendTag(b, 21, protowire.BytesType)
	b = protowire.AppendString(b, "r")
	a := &onnxpb.AttributeProto{}
	if err := proto.Unmarshal(b, a); err != nil {
		t.Fatal(err)
	}
	mp.Graph.Node[0].Attribute = []*onnxpb.AttributeProto{a}
	data := mustMarshal(t, mp)
	m, err := Parse(data, "")
	if err != nil {
		t.Fatal(err)
	}
	saved := mustMarshal(t, m.Proto)
	back := &onnxpb.ModelProto{}
	if err := proto.Unmarshal(saved, back); err != nil {
		t.Fatal(err)
	}
	ga := back.Graph.Node[0].Attribute[0]
	typ := int32(ga.GetType())
	if typ != 77 {
		if v, _, n := protowire.ConsumeField(ga.ProtoReflect().GetUnknown()); n <= 0 || v != 20 {
			t.Fatalf("unknown attribute type lost: type %d, unknown %x", typ, ga.ProtoReflect().GetUnknown())
		}
	}
	if !proto.Equal(m.Proto, back) {
		t.Fatal("round trip changed the model")
	}
	if !bytes.Equal(data, saved) {
		t.Fatal("round trip is not byte-identical")
	}
}
