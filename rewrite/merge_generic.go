//go:build !amd64 || purego

package rewrite

import "github.com/onnxlora/onnxlora/graph"

// useSIMD is false where there are no vector kernels: merge_amd64.s has
// them for amd64 (built without the purego tag).
var useSIMD = false

func rankProductSIMD(acc, urow, v []float64, stride, off int) bool { return false }

func fusedRowSIMD(dt graph.DataType, drow, srow []byte, acc []float64, coef float64, st *mergeStats) bool {
	return false
}

// hasFMA gates the certified kernel, which is amd64's only.
var hasFMA = false

// approxState is the certified kernel's state; there is none here.
type approxState struct{ max float64 }

func (u *update) approx() *approxState { return nil }

func (ax *approxState) row(u *update, drow, srow []byte, p, c0, n int, st *mergeStats) int { return 0 }
