//go:build cgo

package ortrun

// Execution providers other than the CPU. This file keeps its own pointer
// to the C API (the library is already loaded by Init; dlopen with
// RTLD_NOLOAD only finds it again), so the CPU path in capi.go stays as it
// is.

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include "onnxruntime_c_api.h"

static const OrtApi *ortprov_api;
static OrtEnv *ortprov_env;

typedef const OrtApiBase *(*ortprov_get_base_fn)(void);

static char *ortprov_init(const char *path) {
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
	if (!h) return strdup("the ONNX Runtime library is not loaded");
	ortprov_get_base_fn get_base = (ortprov_get_base_fn)dlsym(h, "OrtGetApiBase");
	if (!get_base) return strdup("symbol OrtGetApiBase not found");
	ortprov_api = get_base()->GetApi(ORT_API_VERSION);
	if (!ortprov_api) return strdup("the library does not serve this C API version");
	// ORT's environment is a process-wide singleton: this returns the one
	// Init made, with its reference count raised.
	OrtStatus *st = ortprov_api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "onnxlora", &ortprov_env);
	if (st) {
		char *msg = strdup(ortprov_api->GetErrorMessage(st));
		ortprov_api->ReleaseStatus(st);
		return msg;
	}
	return NULL;
}

static char *ortprov_msg(OrtStatus *st) {
	char *msg = strdup(ortprov_api->GetErrorMessage(st));
	ortprov_api->ReleaseStatus(st);
	return msg;
}

// Writes the provider names, separated by '\n', to a malloc'd string.
static char *ortprov_list(char **out) {
	char **names = NULL;
	int n = 0;
	OrtStatus *st = ortprov_api->GetAvailableProviders(&names, &n);
	if (st) return ortprov_msg(st);
	size_t len = 1;
	for (int i = 0; i < n; i++) len += strlen(names[i]) + 1;
	char *s = calloc(len, 1);
	for (int i = 0; i < n; i++) {
		strcat(s, names[i]);
		if (i + 1 < n) strcat(s, "\n");
	}
	st = ortprov_api->ReleaseAvailableProviders(names, n);
	if (st) ortprov_api->ReleaseStatus(st);
	*out = s;
	return NULL;
}

static char *ortprov_create_cuda(const char *path, int intra, int opt_level, const char *device,
		OrtSession **out) {
	OrtSessionOptions *o = NULL;
	OrtCUDAProviderOptionsV2 *cuda = NULL;
	OrtStatus *st = ortprov_api->CreateSessionOptions(&o);
	if (!st) st = ortprov_api->SetIntraOpNumThreads(o, intra);
	if (!st) st = ortprov_api->SetInterOpNumThreads(o, 1);
	if (!st) st = ortprov_api->SetSessionExecutionMode(o, ORT_SEQUENTIAL);
	if (!st) st = ortprov_api->SetSessionGraphOptimizationLevel(o, (GraphOptimizationLevel)opt_level);
	if (!st) st = ortprov_api->CreateCUDAProviderOptions(&cuda);
	if (!st) {
		const char *keys[] = {"device_id"};
		const char *values[] = {device};
		st = ortprov_api->UpdateCUDAProviderOptions(cuda, keys, values, 1);
	}
	if (!st) st = ortprov_api->SessionOptionsAppendExecutionProvider_CUDA_V2(o, cuda);
	if (!st) st = ortprov_api->CreateSession(ortprov_env, path, o, out);
	if (cuda) ortprov_api->ReleaseCUDAProviderOptions(cuda);
	if (o) ortprov_api->ReleaseSessionOptions(o);
	return st ? ortprov_msg(st) : NULL;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"unsafe"
)

var (
	provOnce sync.Once
	provErr  error
)

func provInit() error {
	if err := Init(); err != nil {
		return err
	}
	provOnce.Do(func() {
		path, err := LibraryPath()
		if err != nil {
			provErr = err
			return
		}
		cpath := C.CString(path)
		defer C.free(unsafe.Pointer(cpath))
		if msg := C.ortprov_init(cpath); msg != nil {
			defer C.free(unsafe.Pointer(msg))
			provErr = errors.New(C.GoString(msg))
		}
	})
	return provErr
}

// Providers lists the execution providers the loaded library was built
// with, e.g. CPUExecutionProvider, CUDAExecutionProvider. A provider that
// ships as a separate library (CUDA's) is listed even when that library
// or its CUDA runtime is missing; OpenCUDA then fails.
func Providers() ([]string, error) {
	if err := provInit(); err != nil {
		return nil, err
	}
	var s *C.char
	if msg := C.ortprov_list(&s); msg != nil {
		defer C.free(unsafe.Pointer(msg))
		return nil, errors.New(C.GoString(msg))
	}
	defer C.free(unsafe.Pointer(s))
	return strings.Split(C.GoString(s), "\n"), nil
}

// OpenCUDA is Open with ONNX Runtime's CUDA execution provider on GPU
// device (0 for the first); nodes CUDA lacks run on the CPU. It fails with
// a clear error when the library has no CUDA provider.
func OpenCUDA(path string, opts *Options, device int) (*Session, error) {
	provs, err := Providers()
	if err != nil {
		return nil, err
	}
	has := false
	for _, p := range provs {
		has = has || p == "CUDAExecutionProvider"
	}
	if !has {
		return nil, fmt.Errorf("ort: the loaded ONNX Runtime has no CUDA provider (it has %s); install a GPU build or use the CPU", strings.Join(provs, ", "))
	}
	intra, level, err := sessionSettings(opts)
	if err != nil {
		return nil, err
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	cdev := C.CString(strconv.Itoa(device))
	defer C.free(unsafe.Pointer(cdev))
	var c *C.OrtSession
	if msg := C.ortprov_create_cuda(cpath, C.int(intra), C.int(level), cdev, &c); msg != nil {
		defer C.free(unsafe.Pointer(msg))
		return nil, fmt.Errorf("ort: opening %s with CUDA: %s", path, strings.TrimSpace(C.GoString(msg)))
	}
	return newSession(path, c)
}
