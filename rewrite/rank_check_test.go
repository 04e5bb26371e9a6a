package rewrite

import (
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
)

// TestInjectRefusesRankAboveLayer: a rank above min(in, out) of every
// selected layer is refused before anything is allocated (a rank of 2^31
// used to die out of memory); with AllowLargeRank it is allowed as long as
// the adapters fit in memory. A rank above a narrow head's min(in, out) in
// a broad selection is PEFT's behaviour and stays allowed.
func TestInjectRefusesRankAboveLayer(t *testing.T) {
	load := func() *graph.Model {
		m, err := graph.Load("../testdata/models/tiny-gpt.onnx")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	cfg := func(rank int, allow bool) InjectConfig {
		return InjectConfig{SelectOptions: SelectOptions{Targets: []string{"q_proj"}, Rank: rank, Alpha: 8}, AllowLargeRank: allow}
	}
	layers, _ := FindLayers(load())
	var q *Layer
	for _, l := range layers {
		if strings.HasSuffix(l.Module, "q_proj") {
			q = l
			break
		}
	}
	lim := int(min(q.In, q.Out))
	if _, err := Inject(load(), cfg(1<<31, false)); err == nil || !strings.Contains(err.Error(), "is more than min(in, out) of every selected layer") {
		t.Errorf("rank 2^31: %v", err)
	}
	if _, err := Inject(load(), cfg(lim+1, false)); err == nil || !strings.Contains(err.Error(), "--allow-large-rank") {
		t.Errorf("rank min(in,out)+1: %v", err)
	}
	if _, err := Inject(load(), cfg(1<<40, true)); err == nil || !strings.Contains(err.Error(), "more than this machine has") {
		t.Errorf("rank 2^40 allowed: %v", err)
	}
	if _, err := Inject(load(), cfg(lim, false)); err != nil {
		t.Errorf("rank min(in,out): %v", err)
	}
	broad := InjectConfig{SelectOptions: SelectOptions{Targets: []string{AllLinear}, Rank: lim, Alpha: 8}}
	layers2, _ := FindLayers(load())
	narrow := false
	for _, l := range layers2 {
		narrow = narrow || min(l.In, l.Out) < int64(lim)
	}
	if _, err := Inject(load(), broad); err != nil {
		t.Errorf("all-linear at rank %d (some layers narrower: %v): %v", lim, narrow, err)
	}
	inj, err := Inject(load(), cfg(lim+1, true))
	if err != nil {
		t.Fatalf("rank min(in,out)+1 allowed: %v", err)
	}
	if inj.Manifest.Adapters[0].Rank != lim+1 {
		t.Errorf("rank %d", inj.Manifest.Adapters[0].Rank)
	}
}
