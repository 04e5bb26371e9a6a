//go:build !cgo

package ortrun

import "fmt"

// Without cgo the package still builds, so pure-Go packages and the CLI do
// too; every use of ORT then fails like a missing library.

var errNoCgo = fmt.Errorf("%w: package ortrun was built without cgo (CGO_ENABLED=0)", ErrNoLibrary)

type (
	cSession struct{}
	cValue   struct{}
	cAdapter struct{}
)

func cLoad(string) (string, error) { return "", errNoCgo }

func cCreateSession(string, int, int, int) (*cSession, error) { return nil, errNoCgo }

func cReleaseSession(*cSession) {}

func cSessionIO(*cSession, ioKind) ([]ioInfo, error) { return nil, errNoCgo }

func cNewTensor([]int64, int, []byte) (*cValue, error) { return nil, errNoCgo }

func cReleaseValue(*cValue) {}

func cRun(*cSession, []string, []*cValue, []string, []*cValue) error { return errNoCgo }

func cValueTensor(*cValue) (int, []int64, []byte, int, error) { return 0, nil, nil, 0, errNoCgo }

func cCreateAdapter(string) (*cAdapter, error) { return nil, errNoCgo }

func cCreateAdapterFromBytes([]byte) (*cAdapter, error) { return nil, errNoCgo }

func cReleaseAdapter(*cAdapter) {}

func cRunAdapters(*cSession, []*cAdapter, []string, []*cValue, []string, []*cValue) error {
	return errNoCgo
}
