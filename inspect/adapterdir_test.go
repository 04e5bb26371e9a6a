package inspect

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/rewrite"
)

func TestBuildShowsAdaptersOfAStrippedModel(t *testing.T) {
	m, err := graph.Load("../testdata/models/tiny-gpt.onnx")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	inj, err := rewrite.Inject(m, rewrite.InjectConfig{SelectOptions: rewrite.SelectOptions{Targets: []string{"v_proj"}, Rank: 2, Alpha: 4}})
	if err != nil {
		t.Fatal(err)
	}
	m.Proto.MetadataProps = nil
	r, err := Build(m, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Adapters) != len(inj.Manifest.Adapters) || r.Totals.Adapted != len(inj.Manifest.Adapters) {
		t.Fatalf("%d adapters shown (%d layers adapted), injected %d", len(r.Adapters), r.Totals.Adapted, len(inj.Manifest.Adapters))
	}
	for _, a := range r.Adapters {
		if !strings.HasSuffix(a.Module, ".v_proj") || a.Rank != 2 || a.Scaling != 2 || a.Norm == nil || *a.Norm != 0 {
			t.Errorf("%+v", a)
		}
	}
}

func TestAdapterDirReport(t *testing.T) {
	m, err := graph.Load("../testdata/peft/base.onnx")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r, err := BuildAdapterDir(m, "base.onnx", "../testdata/peft/embedding/adapter", rewrite.MergeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Unmatched != 0 || r.Problems != 0 || len(r.Modules) != 2 {
		t.Fatalf("%+v", r)
	}
	var b bytes.Buffer
	if err := WriteAdapterDirText(&b, r); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"base_model.model.model.embed_tokens.lora_embedding_A            [4,32]  embedding  model.embed_tokens", "Gather", "[32,16]"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, b.String())
		}
	}
	// Another model's adapter: every module unmatched, none fits.
	r, err = BuildAdapterDir(m, "base.onnx", filepath.Join("../testdata/peft/conv1d/adapter"), rewrite.MergeOptions{})
	if err != nil || r.Unmatched != 4 {
		t.Fatalf("conv1d adapter on base: %v %+v", err, r)
	}
}
