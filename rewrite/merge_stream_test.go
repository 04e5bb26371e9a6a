package rewrite

import (
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/graph"
	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// TestMergeFileStreamsLikeMerge merges every test model with MergeFile
// through the external-data path and compares it with Merge in memory
// followed by Save: the same tensors, bit for bit, and the same graph.
func TestMergeFileStreamsLikeMerge(t *testing.T) {
	for _, c := range mgTestdataCases() {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			m := loadModel(t, c.modelPath(t))
			mgInjectRandom(t, m, c.inject, 31)
			// Weights external from the start, so the stream copies some
			// and merges others from the input's data file.
			injPath := filepath.Join(dir, "in", "model.onnx")
			os.MkdirAll(filepath.Dir(injPath), 0o755)
			if err := m.Save(injPath, graph.SaveOptions{External: graph.ExternalAlways, Threshold: 256}); err != nil {
				t.Fatal(err)
			}
			mem := loadModel(t, injPath)
			if _, err := Merge(mem, MergeOptions{Scale: 0.75}); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out", "model.onnx")
			os.MkdirAll(filepath.Dir(out), 0o755)
			if _, err := MergeFile(injPath, out, MergeOptions{Scale: 0.75}, graph.SaveOptions{}); err != nil {
				t.Fatal(err)
			}
			mgSameTensors(t, mem, loadModel(t, out))
			mgCheckOutputFiles(t, filepath.Dir(out), "model.onnx")
		})
	}
}

// mgCheckOutputFiles checks that dir holds the model and its one data file,
// both mode 0644 (as the umask of the tests leaves it), and no temporaries.
func mgCheckOutputFiles(t *testing.T, dir, model string) string {
	t.Helper()
	m := loadModel(t, filepath.Join(dir, model))
	data := map[string]bool{}
	m.Tensors(func(tp *onnxpb.TensorProto) {
		if graph.IsExternal(tp) {
			ref, err := m.ExternalRef(tp)
			if err != nil {
				t.Fatal(err)
			}
			data[ref.Location] = true
		}
	})
	want := []string{model}
	var dataFile string
	for loc := range data {
		want = append(want, loc)
		dataFile = loc
	}
	slices.Sort(want)
	entries, _ := os.ReadDir(dir)
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
		st, _ := e.Info()
		if st.Mode().Perm() != 0o644 {
			t.Errorf("%s has mode %v, want 0644", e.Name(), st.Mode().Perm())
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("output folder holds %v, want %v", got, want)
	}
	return dataFile
}

// TestMergeFileReplacesEarlierOutput streams into the same output three
// times: each time the output is complete and alone in its folder (the
// earlier data file is gone), and a failed merge (Safe refusing NaN)
// leaves the last output exactly as it was.
func TestMergeFileReplacesEarlierOutput(t *testing.T) {
	dir := t.TempDir()
	m := loadModel(t, mgTestModels+"/tiny-gpt-extdata/model.onnx")
	mgInjectRandom(t, m, InjectConfig{}, 41)
	injPath := filepath.Join(dir, "in", "model.onnx")
	os.MkdirAll(filepath.Dir(injPath), 0o755)
	if err := m.Save(injPath, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out", "merged.onnx")
	os.MkdirAll(filepath.Dir(out), 0o755)
	var prev string
	for i, scale := range []float64{1, 0.5, -1} {
		if _, err := MergeFile(injPath, out, MergeOptions{Scale: scale}, graph.SaveOptions{}); err != nil {
			t.Fatal(err)
		}
		data := mgCheckOutputFiles(t, filepath.Dir(out), "merged.onnx")
		if i > 0 && data == prev {
			t.Errorf("merge %d wrote its data over the earlier output's %s", i, prev)
		}
		prev = data
	}
	before := map[string][]byte{}
	entries, _ := os.ReadDir(filepath.Dir(out))
	for _, e := range entries {
		before[e.Name()], _ = os.ReadFile(filepath.Join(filepath.Dir(out), e.Name()))
	}
	// A NaN in one adapter makes the safe merge fail part way.
	bad := loadModel(t, injPath)
	man, _ := ReadManifest(bad)
	b, _ := bad.Graph().Initializer(man.Adapters[0].LoraB)
	vals, _ := bad.Float64s(b)
	vals[0] = math.NaN()
	if err := graph.SetFloat64s(b, vals); err != nil {
		t.Fatal(err)
	}
	badPath := filepath.Join(dir, "bad", "model.onnx")
	os.MkdirAll(filepath.Dir(badPath), 0o755)
	if err := bad.Save(badPath, graph.SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := MergeFile(badPath, out, MergeOptions{Safe: true}, graph.SaveOptions{}); err == nil || !strings.Contains(err.Error(), "safe merge") {
		t.Fatalf("safe merge of a NaN adapter: %v", err)
	}
	entries, _ = os.ReadDir(filepath.Dir(out))
	if len(entries) != len(before) {
		t.Errorf("after the failed merge the folder holds %d files, had %d", len(entries), len(before))
	}
	for name, old := range before {
		if now, err := os.ReadFile(filepath.Join(filepath.Dir(out), name)); err != nil || !slices.Equal(now, old) {
			t.Errorf("the failed merge changed %s", name)
		}
	}
}
