package graph

import (
	"fmt"
	"runtime/debug"

	"github.com/onnxlora/onnxlora/graph/onnxpb"
)

// Validation on load: every tensor must hold exactly the data its dims
// claim, in exactly one place (raw_data, the typed field of its type, or
// an external file), so nothing later allocates for data that is not there.

// typedValues returns how many values t's typed field holds, how many its
// dims need, and the field's name. ok is false for types without a typed
// field this package reads.
func typedValues(t *onnxpb.TensorProto, dt DataType, n int64) (have, want int64, field string, ok bool) {
	switch onnxpb.TensorProto_DataType(dt) {
	case onnxpb.TensorProto_FLOAT:
		return int64(len(t.FloatData)), n, "float_data", true
	case onnxpb.TensorProto_COMPLEX64:
		return int64(len(t.FloatData)), 2 * n, "float_data", true // real and imaginary parts
	case onnxpb.TensorProto_DOUBLE:
		return int64(len(t.DoubleData)), n, "double_data", true
	case onnxpb.TensorProto_COMPLEX128:
		return int64(len(t.DoubleData)), 2 * n, "double_data", true
	case onnxpb.TensorProto_INT64:
		return int64(len(t.Int64Data)), n, "int64_data", true
	case onnxpb.TensorProto_UINT32, onnxpb.TensorProto_UINT64:
		return int64(len(t.Uint64Data)), n, "uint64_data", true
	case onnxpb.TensorProto_STRING:
		return int64(len(t.StringData)), n, "string_data", true
	}
	bits := dt.BitSize()
	if bits == 0 || bits > 32 {
		return 0, 0, "", false
	}
	if bits < 8 {
		// Sub-byte types are packed, one byte's worth per int32_data entry.
		return int64(len(t.Int32Data)), (n*int64(bits) + 7) / 8, "int32_data", true
	}
	return int64(len(t.Int32Data)), n, "int32_data", true
}

// typedCount is the number of values in all typed fields of t.
func typedCount(t *onnxpb.TensorProto) int {
	return len(t.FloatData) + len(t.Int32Data) + len(t.Int64Data) + len(t.DoubleData) + len(t.Uint64Data) + len(t.StringData)
}

func (m *Model) validateTensor(t *onnxpb.TensorProto) error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("tensor %q: "+format, append([]any{t.GetName()}, args...)...)
	}
	dt := DataType(t.GetDataType())
	n, err := NumElements(t.Dims)
	if err != nil {
		return fail("%v", err)
	}
	if t.Segment != nil {
		return nil // one part of a tensor split over several protos
	}
	if IsExternal(t) {
		_, err := m.externalRef(t)
		return err
	}
	if _, _, lazy := inlineRef(t); lazy {
		return validateInline(t) // raw_data Load left in the file
	}
	typed := typedCount(t)
	if t.RawData != nil {
		if typed > 0 {
			return fail("holds both raw_data and %d typed values; ONNX allows one", typed)
		}
		if dt == String {
			return fail("STRING data cannot be in raw_data")
		}
		if dt.BitSize() == 0 {
			return nil // an unknown type: its size cannot be checked
		}
		want, err := ByteSize(dt, t.Dims)
		if err != nil {
			return fail("%v", err)
		}
		if int64(len(t.RawData)) != want {
			return fail("raw_data has %d bytes, but %v %v needs %d", len(t.RawData), dt, t.Dims, want)
		}
		return nil
	}
	have, want, field, ok := typedValues(t, dt, n)
	if !ok {
		if typed > 0 && dt.BitSize() > 0 {
			return fail("%v data in typed fields is not supported", dt)
		}
		return nil
	}
	if have != int64(typed) {
		return fail("%v data must be in %s, but %d of its %d typed values are in other fields", dt, field, int64(typed)-have, typed)
	}
	if have != want {
		if have == 0 && len(t.ExternalData) > 0 {
			return fail("has external_data entries but data_location is not EXTERNAL, and no data of its own; %v %v needs %d values", dt, t.Dims, want)
		}
		if have == 0 {
			return fail("%v %v needs %d values, but the tensor holds no data", dt, t.Dims, want)
		}
		return fail("%v %v needs %d values in %s, the tensor holds %d", dt, t.Dims, want, field, have)
	}
	return nil
}

// CheckAlloc refuses to allocate size bytes for what when that is more
// than the machine's memory (or the Go memory limit, if set lower): the
// error is one clear line, not Go's fatal "out of memory".
func CheckAlloc(size int64, what string) error {
	if size < 0 {
		return fmt.Errorf("%s: negative size %d", what, size)
	}
	if limit := memoryLimit(); size > limit {
		return fmt.Errorf("%s: needs %s of memory, more than this machine has (%s)", what, formatBytes(size), formatBytes(limit))
	}
	return nil
}

// memoryLimit is the most one allocation may take: the physical memory,
// or the Go memory limit when that is set lower.
func memoryLimit() int64 {
	limit := physicalMemory()
	if l := debug.SetMemoryLimit(-1); l > 0 && l < limit {
		limit = l
	}
	return limit
}

func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), 0
	for v >= unit && i < 6 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[i-1])
}
