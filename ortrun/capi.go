//go:build cgo

package ortrun

// The ORT C API is a table of function pointers that Go cannot call
// directly, so each call used here has a small C wrapper below. Errors come
// back as OrtStatus pointers and are turned into Go errors by statusErr.

/*
#cgo CFLAGS: -I${SRCDIR}/include -O2
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "onnxruntime_c_api.h"

static const OrtApi *ortrun_api;
static OrtEnv *ortrun_env;
static OrtAllocator *ortrun_alloc;

typedef const OrtApiBase *(*ortrun_get_base_fn)(void);

// Loads the library, picks API version ORT_API_VERSION and creates the
// process-wide environment. Returns NULL or a malloc'd error message. The
// library is never unloaded: sessions may live until the process exits.
// Logging is FATAL only because every error also comes back as a status.
static char *ortrun_load(const char *path, const char **version) {
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) return strdup(dlerror());
	ortrun_get_base_fn get_base = (ortrun_get_base_fn)dlsym(h, "OrtGetApiBase");
	if (!get_base) return strdup("symbol OrtGetApiBase not found");
	const OrtApiBase *base = get_base();
	*version = base->GetVersionString();
	ortrun_api = base->GetApi(ORT_API_VERSION);
	if (!ortrun_api) {
		char buf[128];
		snprintf(buf, sizeof buf, "library %s does not serve C API version %d",
			*version, ORT_API_VERSION);
		return strdup(buf);
	}
	OrtStatus *st = ortrun_api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "onnxlora", &ortrun_env);
	if (!st) st = ortrun_api->GetAllocatorWithDefaultOptions(&ortrun_alloc);
	if (st) {
		char *msg = strdup(ortrun_api->GetErrorMessage(st));
		ortrun_api->ReleaseStatus(st);
		return msg;
	}
	return NULL;
}

// Returns a malloc'd copy of the status message and releases the status.
static char *ortrun_status_msg(OrtStatus *st) {
	char *msg = strdup(ortrun_api->GetErrorMessage(st));
	ortrun_api->ReleaseStatus(st);
	return msg;
}

static OrtStatus *ortrun_error(const char *msg) {
	return ortrun_api->CreateStatus(ORT_INVALID_ARGUMENT, msg);
}

static OrtStatus *ortrun_create_session(const char *path, int intra, int inter,
		int opt_level, OrtSession **out) {
	OrtSessionOptions *o = NULL;
	OrtStatus *st = ortrun_api->CreateSessionOptions(&o);
	if (!st) st = ortrun_api->SetIntraOpNumThreads(o, intra);
	if (!st) st = ortrun_api->SetInterOpNumThreads(o, inter);
	if (!st) st = ortrun_api->SetSessionExecutionMode(o, ORT_SEQUENTIAL);
	if (!st) st = ortrun_api->SetSessionGraphOptimizationLevel(o, (GraphOptimizationLevel)opt_level);
	if (!st) st = ortrun_api->CreateSession(ortrun_env, path, o, out);
	if (o) ortrun_api->ReleaseSessionOptions(o);
	return st;
}

static void ortrun_release_session(OrtSession *s) { ortrun_api->ReleaseSession(s); }

// kind: 0 inputs, 1 outputs, 2 overridable initializers (initializers that
// are also graph inputs: fed like inputs, defaulting to their values).
static OrtStatus *ortrun_io_count(OrtSession *s, int kind, size_t *n) {
	return kind == 1 ? ortrun_api->SessionGetOutputCount(s, n)
	     : kind == 2 ? ortrun_api->SessionGetOverridableInitializerCount(s, n)
	                 : ortrun_api->SessionGetInputCount(s, n);
}

// Description of one graph input or output. All pointers are malloc'd and
// freed by ortrun_free_io.
typedef struct {
	char *name;
	int onnx_type;
	int elem_type;
	size_t ndim;
	int64_t *dims;
	char **dim_names;
} ortrun_io;

static char *ortrun_dup(const char *s) { return strdup(s ? s : ""); }

static void ortrun_free_io(ortrun_io *io) {
	if (io->dim_names) {
		for (size_t i = 0; i < io->ndim; i++) free(io->dim_names[i]);
	}
	free(io->dim_names);
	free(io->dims);
	free(io->name);
	memset(io, 0, sizeof *io);
}

static OrtStatus *ortrun_get_io(OrtSession *s, int kind, size_t i, ortrun_io *io) {
	memset(io, 0, sizeof *io);
	char *name = NULL;
	OrtStatus *st = kind == 1 ? ortrun_api->SessionGetOutputName(s, i, ortrun_alloc, &name)
	              : kind == 2 ? ortrun_api->SessionGetOverridableInitializerName(s, i, ortrun_alloc, &name)
	                          : ortrun_api->SessionGetInputName(s, i, ortrun_alloc, &name);
	if (st) return st;
	io->name = ortrun_dup(name);
	OrtStatus *fst = ortrun_api->AllocatorFree(ortrun_alloc, name);
	if (fst) ortrun_api->ReleaseStatus(fst);

	OrtTypeInfo *ti = NULL;
	st = kind == 1 ? ortrun_api->SessionGetOutputTypeInfo(s, i, &ti)
	   : kind == 2 ? ortrun_api->SessionGetOverridableInitializerTypeInfo(s, i, &ti)
	               : ortrun_api->SessionGetInputTypeInfo(s, i, &ti);
	if (st) return st;
	enum ONNXType ot = ONNX_TYPE_UNKNOWN;
	st = ortrun_api->GetOnnxTypeFromTypeInfo(ti, &ot);
	io->onnx_type = (int)ot;
	if (!st && ot == ONNX_TYPE_TENSOR) {
		// Owned by ti: not released separately.
		const OrtTensorTypeAndShapeInfo *tsi = NULL;
		st = ortrun_api->CastTypeInfoToTensorInfo(ti, &tsi);
		ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
		if (!st) st = ortrun_api->GetTensorElementType(tsi, &et);
		io->elem_type = (int)et;
		if (!st) st = ortrun_api->GetDimensionsCount(tsi, &io->ndim);
		if (!st && io->ndim > 0) {
			io->dims = calloc(io->ndim, sizeof(int64_t));
			const char **names = calloc(io->ndim, sizeof(char *));
			io->dim_names = calloc(io->ndim, sizeof(char *));
			if (!io->dims || !names || !io->dim_names) {
				free(names);
				ortrun_api->ReleaseTypeInfo(ti);
				// Leave ndim 0 so ortrun_free_io skips the name entries.
				io->ndim = 0;
				return ortrun_error("out of memory");
			}
			st = ortrun_api->GetDimensions(tsi, io->dims, io->ndim);
			// Dim names are informative only, so a failure leaves them empty.
			OrtStatus *st2 = ortrun_api->GetSymbolicDimensions(tsi, names, io->ndim);
			if (st2) {
				ortrun_api->ReleaseStatus(st2);
				memset(names, 0, io->ndim * sizeof(char *));
			}
			for (size_t d = 0; d < io->ndim; d++) io->dim_names[d] = ortrun_dup(names[d]);
			free(names);
		}
	}
	ortrun_api->ReleaseTypeInfo(ti);
	return st;
}

// Creates an ORT-owned tensor and copies nbytes from src into it, so no Go
// memory is retained by C after the call.
static OrtStatus *ortrun_new_tensor(const int64_t *shape, size_t ndim, int elem_type,
		const void *src, size_t nbytes, OrtValue **out) {
	*out = NULL;
	OrtValue *v = NULL;
	OrtStatus *st = ortrun_api->CreateTensorAsOrtValue(ortrun_alloc, shape, ndim,
		(ONNXTensorElementDataType)elem_type, &v);
	if (st) return st;
	size_t want = 0;
	st = ortrun_api->GetTensorSizeInBytes(v, &want);
	if (!st && want != nbytes) {
		char buf[160];
		snprintf(buf, sizeof buf, "tensor needs %zu bytes, got %zu", want, nbytes);
		st = ortrun_error(buf);
	}
	if (!st && nbytes > 0) {
		void *dst = NULL;
		st = ortrun_api->GetTensorMutableData(v, &dst);
		if (!st) memcpy(dst, src, nbytes);
	}
	if (st) {
		ortrun_api->ReleaseValue(v);
		return st;
	}
	*out = v;
	return NULL;
}

static void ortrun_release_value(OrtValue *v) { if (v) ortrun_api->ReleaseValue(v); }

static OrtStatus *ortrun_run(OrtSession *s, const char *const *in_names,
		const OrtValue *const *ins, size_t n_in, const char *const *out_names,
		size_t n_out, OrtValue **outs) {
	return ortrun_api->Run(s, NULL, in_names, ins, n_in, out_names, n_out, outs);
}

// LoRA adapters (ORT >= 1.20). The allocator is NULL so the parameters stay
// in CPU memory; CreateLoraAdapter memory-maps the file.
static OrtStatus *ortrun_create_lora_adapter(const char *path, OrtLoraAdapter **out) {
	return ortrun_api->CreateLoraAdapter(path, NULL, out);
}

static OrtStatus *ortrun_create_lora_adapter_bytes(const void *bytes, size_t n, OrtLoraAdapter **out) {
	return ortrun_api->CreateLoraAdapterFromArray(bytes, n, NULL, out);
}

static void ortrun_release_lora_adapter(OrtLoraAdapter *a) { if (a) ortrun_api->ReleaseLoraAdapter(a); }

// Run with the given adapters active, through run options made for this
// call only, so concurrent runs can use different adapters.
static OrtStatus *ortrun_run_adapters(OrtSession *s, OrtLoraAdapter *const *adapters,
		size_t n_adapters, const char *const *in_names, const OrtValue *const *ins,
		size_t n_in, const char *const *out_names, size_t n_out, OrtValue **outs) {
	OrtRunOptions *ro = NULL;
	OrtStatus *st = ortrun_api->CreateRunOptions(&ro);
	for (size_t i = 0; !st && i < n_adapters; i++)
		st = ortrun_api->RunOptionsAddActiveLoraAdapter(ro, adapters[i]);
	if (!st) st = ortrun_api->Run(s, ro, in_names, ins, n_in, out_names, n_out, outs);
	if (ro) ortrun_api->ReleaseRunOptions(ro);
	return st;
}

// Reads type, rank, byte size and data pointer of a tensor value. For
// non-tensor values only onnx_type is set.
static OrtStatus *ortrun_value_meta(const OrtValue *v, int *onnx_type, int *elem_type,
		size_t *ndim, size_t *nbytes, void **data) {
	enum ONNXType ot = ONNX_TYPE_UNKNOWN;
	OrtStatus *st = ortrun_api->GetValueType(v, &ot);
	*onnx_type = (int)ot;
	if (st || ot != ONNX_TYPE_TENSOR) return st;
	OrtTensorTypeAndShapeInfo *tsi = NULL;
	st = ortrun_api->GetTensorTypeAndShape(v, &tsi);
	if (st) return st;
	ONNXTensorElementDataType et = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
	st = ortrun_api->GetTensorElementType(tsi, &et);
	*elem_type = (int)et;
	if (!st) st = ortrun_api->GetDimensionsCount(tsi, ndim);
	ortrun_api->ReleaseTensorTypeAndShapeInfo(tsi);
	if (st || et == ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING) return st;
	st = ortrun_api->GetTensorSizeInBytes(v, nbytes);
	*data = NULL;
	if (!st && *nbytes > 0) st = ortrun_api->GetTensorMutableData((OrtValue *)v, data);
	return st;
}

static OrtStatus *ortrun_value_dims(const OrtValue *v, int64_t *dims, size_t ndim) {
	OrtTensorTypeAndShapeInfo *tsi = NULL;
	OrtStatus *st = ortrun_api->GetTensorTypeAndShape(v, &tsi);
	if (st) return st;
	st = ortrun_api->GetDimensions(tsi, dims, ndim);
	ortrun_api->ReleaseTensorTypeAndShapeInfo(tsi);
	return st;
}
*/
import "C"

import (
	"errors"
	"strings"
	"unsafe"
)

// The C types are aliased so the rest of the package reads as Go.
type (
	cSession = C.OrtSession
	cValue   = C.OrtValue
	cAdapter = C.OrtLoraAdapter
)

// statusErr converts an OrtStatus into an error and releases it.
func statusErr(st *C.OrtStatus) error {
	if st == nil {
		return nil
	}
	msg := C.ortrun_status_msg(st)
	defer C.free(unsafe.Pointer(msg))
	// Some ORT messages end in a newline and indentation; errors are one line.
	return errors.New(strings.ReplaceAll(strings.TrimSpace(C.GoString(msg)), "\n", " "))
}

// cLoad loads the library at path and returns its version string.
func cLoad(path string) (string, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var version *C.char
	if msg := C.ortrun_load(cpath, &version); msg != nil {
		defer C.free(unsafe.Pointer(msg))
		return "", errors.New(C.GoString(msg))
	}
	return C.GoString(version), nil
}

func cCreateSession(path string, intra, inter, optLevel int) (*cSession, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var s *C.OrtSession
	if err := statusErr(C.ortrun_create_session(cpath, C.int(intra), C.int(inter), C.int(optLevel), &s)); err != nil {
		return nil, err
	}
	return s, nil
}

func cReleaseSession(s *cSession) { C.ortrun_release_session(s) }

// cSessionIO lists the inputs (output=false) or outputs of a session.
func cSessionIO(s *cSession, kind ioKind) ([]ioInfo, error) {
	flag := C.int(kind)
	var n C.size_t
	if err := statusErr(C.ortrun_io_count(s, flag, &n)); err != nil {
		return nil, err
	}
	infos := make([]ioInfo, int(n))
	for i := range infos {
		var io C.ortrun_io
		st := C.ortrun_get_io(s, flag, C.size_t(i), &io)
		info := ioInfo{
			name:     C.GoString(io.name),
			onnxType: int(io.onnx_type),
			elemType: int(io.elem_type),
		}
		if io.ndim > 0 && io.dims != nil {
			info.dims = append([]int64(nil), unsafe.Slice((*int64)(unsafe.Pointer(io.dims)), int(io.ndim))...)
			names := unsafe.Slice(io.dim_names, int(io.ndim))
			info.dimNames = make([]string, len(names))
			for d, p := range names {
				info.dimNames[d] = C.GoString(p)
			}
		} else {
			info.dims = []int64{}
			info.dimNames = []string{}
		}
		C.ortrun_free_io(&io)
		if err := statusErr(st); err != nil {
			return nil, err
		}
		infos[i] = info
	}
	return infos, nil
}

// cNewTensor creates an ORT-owned tensor holding a copy of data.
func cNewTensor(shape []int64, elemType int, data []byte) (*cValue, error) {
	var shapePtr *C.int64_t
	if len(shape) > 0 {
		shapePtr = (*C.int64_t)(unsafe.Pointer(&shape[0]))
	}
	var dataPtr unsafe.Pointer
	if len(data) > 0 {
		dataPtr = unsafe.Pointer(&data[0])
	}
	var v *C.OrtValue
	st := C.ortrun_new_tensor(shapePtr, C.size_t(len(shape)), C.int(elemType), dataPtr, C.size_t(len(data)), &v)
	if err := statusErr(st); err != nil {
		return nil, err
	}
	return v, nil
}

func cReleaseValue(v *cValue) { C.ortrun_release_value(v) }

// cRun runs s; outs must have len(outNames) nil entries, which ORT fills with
// values that the caller must release (also on error).
func cRun(s *cSession, inNames []string, ins []*cValue, outNames []string, outs []*cValue) error {
	cIn, cOut := cStrings(inNames), cStrings(outNames)
	defer freeCStrings(cIn)
	defer freeCStrings(cOut)
	var inNamesPtr, outNamesPtr **C.char
	var insPtr, outsPtr **C.OrtValue
	if len(ins) > 0 {
		inNamesPtr, insPtr = &cIn[0], &ins[0]
	}
	if len(outs) > 0 {
		outNamesPtr, outsPtr = &cOut[0], &outs[0]
	}
	return statusErr(C.ortrun_run(s, inNamesPtr, insPtr, C.size_t(len(ins)), outNamesPtr, C.size_t(len(outs)), outsPtr))
}

// cValueTensor copies a tensor value into Go memory. For a value that is not
// a tensor (sequence, map, ...) only onnxType is set.
func cValueTensor(v *cValue) (elemType int, shape []int64, data []byte, onnxType int, err error) {
	var ot, et C.int
	var ndim, nbytes C.size_t
	var ptr unsafe.Pointer
	if err = statusErr(C.ortrun_value_meta(v, &ot, &et, &ndim, &nbytes, &ptr)); err != nil {
		return 0, nil, nil, int(ot), err
	}
	if int(ot) != onnxTypeTensor {
		return 0, nil, nil, int(ot), nil
	}
	shape = make([]int64, int(ndim))
	if ndim > 0 {
		if err = statusErr(C.ortrun_value_dims(v, (*C.int64_t)(unsafe.Pointer(&shape[0])), ndim)); err != nil {
			return 0, nil, nil, int(ot), err
		}
	}
	data = make([]byte, int(nbytes))
	if nbytes > 0 {
		copy(data, unsafe.Slice((*byte)(ptr), int(nbytes)))
	}
	return int(et), shape, data, int(ot), nil
}

// cStrings converts names to C strings; free them with freeCStrings.
func cStrings(names []string) []*C.char {
	out := make([]*C.char, len(names))
	for i, n := range names {
		out[i] = C.CString(n)
	}
	return out
}

func freeCStrings(ps []*C.char) {
	for _, p := range ps {
		C.free(unsafe.Pointer(p))
	}
}

// cCreateAdapter loads an .onnx_adapter file with ORT's own reader.
func cCreateAdapter(path string) (*cAdapter, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var a *C.OrtLoraAdapter
	if err := statusErr(C.ortrun_create_lora_adapter(cpath, &a)); err != nil {
		return nil, err
	}
	return a, nil
}

// cCreateAdapterFromBytes makes an adapter from a buffer, which ORT copies.
func cCreateAdapterFromBytes(buf []byte) (*cAdapter, error) {
	var p unsafe.Pointer
	if len(buf) > 0 {
		p = unsafe.Pointer(&buf[0])
	}
	var a *C.OrtLoraAdapter
	if err := statusErr(C.ortrun_create_lora_adapter_bytes(p, C.size_t(len(buf)), &a)); err != nil {
		return nil, err
	}
	return a, nil
}

func cReleaseAdapter(a *cAdapter) { C.ortrun_release_lora_adapter(a) }

// cRunAdapters is cRun with adapters active for this run.
func cRunAdapters(s *cSession, adapters []*cAdapter, inNames []string, ins []*cValue, outNames []string, outs []*cValue) error {
	cIn, cOut := cStrings(inNames), cStrings(outNames)
	defer freeCStrings(cIn)
	defer freeCStrings(cOut)
	var inNamesPtr, outNamesPtr **C.char
	var insPtr, outsPtr **C.OrtValue
	var adPtr **C.OrtLoraAdapter
	if len(ins) > 0 {
		inNamesPtr, insPtr = &cIn[0], &ins[0]
	}
	if len(outs) > 0 {
		outNamesPtr, outsPtr = &cOut[0], &outs[0]
	}
	if len(adapters) > 0 {
		adPtr = &adapters[0]
	}
	return statusErr(C.ortrun_run_adapters(s, adPtr, C.size_t(len(adapters)), inNamesPtr, insPtr, C.size_t(len(ins)), outNamesPtr, C.size_t(len(outs)), outsPtr))
}
