package verify

import (
	"fmt"
	"sort"
	"strings"

	"github.com/onnxlora/onnxlora/ortrun"
)

// checkCompatible requires the same input and output names and dtypes, and
// input shapes that do not contradict each other.
func checkCompatible(a, b string, sa, sb *ortrun.Session) error {
	var problems []string
	diff := func(kind string, xs, ys []ortrun.TensorInfo, shapes bool) {
		byName := map[string]ortrun.TensorInfo{}
		for _, y := range ys {
			byName[y.Name] = y
		}
		for _, x := range xs {
			y, ok := byName[x.Name]
			if !ok {
				problems = append(problems, fmt.Sprintf("%s %q of A is not in B", kind, x.Name))
				continue
			}
			delete(byName, x.Name)
			if x.DType != y.DType {
				problems = append(problems, fmt.Sprintf("%s %q is %v in A, %v in B", kind, x.Name, x.DType, y.DType))
				continue
			}
			if shapes && !shapesAgree(x.Shape, y.Shape) {
				problems = append(problems, fmt.Sprintf("%s %q is %s in A, %s in B", kind, x.Name, formatInfoShape(x), formatInfoShape(y)))
			}
		}
		var extra []string
		for name := range byName {
			extra = append(extra, name)
		}
		sort.Strings(extra)
		for _, name := range extra {
			problems = append(problems, fmt.Sprintf("%s %q of B is not in A", kind, name))
		}
	}
	diff("input", sa.Inputs(), sb.Inputs(), true)
	diff("output", sa.Outputs(), sb.Outputs(), false)
	if len(problems) == 0 {
		return nil
	}
	if len(problems) > 3 {
		problems = append(problems[:3], fmt.Sprintf("and %d more", len(problems)-3))
	}
	return fmt.Errorf("models differ in their interface, so they cannot be compared (A = %s, B = %s): %s", a, b, strings.Join(problems, "; "))
}

// shapesAgree reports whether two declared shapes can hold the same tensor.
func shapesAgree(x, y []int64) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if x[i] >= 0 && y[i] >= 0 && x[i] != y[i] {
			return false
		}
	}
	return true
}

// bindFixed matches fixed inputs to the model's inputs, converts them to
// the inputs' dtypes and returns them with the dims they set, merged with
// the user's dims.
func bindFixed(model string, inputs []ortrun.TensorInfo, tensors []ortrun.Tensor, userDims map[string]int64) (map[string]ortrun.Tensor, map[string]int64, error) {
	dims := map[string]int64{}
	for k, v := range userDims {
		dims[k] = v
	}
	byName := map[string]ortrun.TensorInfo{}
	var names []string
	for _, in := range inputs {
		byName[in.Name] = in
		names = append(names, in.Name)
	}
	fixed := map[string]ortrun.Tensor{}
	from := map[string]string{} // dim name -> the input that set it
	for _, t := range tensors {
		in, ok := byName[t.Name]
		if !ok {
			return nil, nil, fmt.Errorf("fixed input %q is not an input of %s (its inputs: %s)", t.Name, model, strings.Join(names, ", "))
		}
		c, err := conform(t, in)
		if err != nil {
			return nil, nil, err
		}
		fixed[t.Name] = c
		for i, d := range in.Shape {
			name := dimName(in, i)
			if d >= 0 || name == "" {
				continue
			}
			v := c.Shape[i]
			if old, ok := dims[name]; ok && old != v {
				src := "--dim"
				if from[name] != "" {
					src = "input " + from[name]
				}
				return nil, nil, fmt.Errorf("dim %s is %d in input %q but %d in %s", name, v, t.Name, old, src)
			}
			dims[name] = v
			if from[name] == "" {
				if _, user := userDims[name]; !user {
					from[name] = t.Name
				}
			}
		}
	}
	return fixed, dims, nil
}
