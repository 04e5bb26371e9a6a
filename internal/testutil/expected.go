package testutil

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// PEFTConversion is one module of testdata/adapters/peft_expected.json:
// generate.py's numpy conversion of a PEFT dir to ONNX Runtime's layout.
type PEFTConversion struct {
	Module   string    `json:"module"`
	Rank     int       `json:"rank"`
	Alpha    float64   `json:"alpha"`
	Scaling  float64   `json:"scaling"`
	ADims    []int64   `json:"A_dims"`
	BDims    []int64   `json:"B_dims"`
	AF32     []float64 `json:"A_f32"`
	BF32     []float64 `json:"B_f32"`
	AF16Bits []uint16  `json:"A_f16_bits"`
	BF16Bits []uint16  `json:"B_f16_bits"`
}

// PEFTConversions reads testdata/adapters/peft_expected.json: for each PEFT
// dir there (by name), its modules as numpy converted them.
func PEFTConversions(t testing.TB) map[string][]PEFTConversion {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(RepoRoot(), "testdata", "adapters", "peft_expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string][]PEFTConversion
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// RelErr is ‖got − want‖ / ‖want‖ (‖got − want‖ when want is zero), or +Inf
// when the lengths differ.
func RelErr(got, want []float64) float64 {
	if len(got) != len(want) {
		return math.Inf(1)
	}
	var d, n float64
	for i := range got {
		d += (got[i] - want[i]) * (got[i] - want[i])
		n += want[i] * want[i]
	}
	if n == 0 {
		return math.Sqrt(d)
	}
	return math.Sqrt(d / n)
}
