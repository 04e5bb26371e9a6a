//go:build !cgo

package ortrun

// Providers fails without cgo, like every use of ORT.
func Providers() ([]string, error) { return nil, errNoCgo }

// OpenCUDA fails without cgo, like Open.
func OpenCUDA(string, *Options, int) (*Session, error) { return nil, errNoCgo }
