package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/onnxlora/onnxlora/internal/termsafe"
)

// IOStreams are the streams a command reads and writes. Commands never touch
// os.Stdin/os.Stdout/os.Stderr directly, so tests run them against buffers.
type IOStreams struct {
	In     io.Reader
	Out    io.Writer
	ErrOut io.Writer
	// ErrTTY is true when ErrOut is a terminal. Progress is drawn only then.
	ErrTTY bool
	// Quiet is set by --quiet: print the requested output and errors only,
	// no summaries, notes or progress.
	Quiet bool
	// ProgressDelay is how long an operation runs before a spinner appears,
	// so quick loads and saves stay silent (default 750ms).
	ProgressDelay time.Duration
}

// SystemIO returns the process's standard streams.
func SystemIO() *IOStreams {
	return &IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr, ErrTTY: isTerminal(os.Stderr)}
}

// TestIO returns streams backed by buffers, as a non-terminal.
func TestIO() (ios *IOStreams, in, out, errOut *bytes.Buffer) {
	in, out, errOut = &bytes.Buffer{}, &bytes.Buffer{}, &bytes.Buffer{}
	return &IOStreams{In: in, Out: out, ErrOut: errOut}, in, out, errOut
}

// isTerminal reports whether f is a character device (a terminal), without
// a dependency on golang.org/x/term. TERM=dumb counts as no terminal.
func isTerminal(f *os.File) bool {
	if os.Getenv("TERM") == "dumb" {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// Notef prints an informational line on ErrOut unless Quiet.
func (s *IOStreams) Notef(format string, args ...any) {
	if s.Quiet {
		return
	}
	fmt.Fprintln(s.ErrOut, termsafe.Escape(fmt.Sprintf(format, args...)))
}

// Warnf prints "warning: ..." on ErrOut unless Quiet.
func (s *IOStreams) Warnf(format string, args ...any) {
	if s.Quiet {
		return
	}
	fmt.Fprintln(s.ErrOut, "warning: "+termsafe.Escape(fmt.Sprintf(format, args...)))
}

// StartProgress draws a spinner with label on ErrOut while a long operation
// runs, and returns the function that stops it and clears the line. Nothing
// is drawn unless ErrOut is a terminal and --quiet is off, and nothing
// appears for operations shorter than ProgressDelay.
func (s *IOStreams) StartProgress(label string) (stop func()) {
	if !s.ErrTTY || s.Quiet {
		return func() {}
	}
	delay := s.ProgressDelay
	if delay <= 0 {
		delay = 750 * time.Millisecond
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		start := time.Now()
		select {
		case <-done:
			return
		case <-time.After(delay):
		}
		frames := []rune(`|/-\`)
		tick := time.NewTicker(120 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			fmt.Fprintf(s.ErrOut, "\r\x1b[K%c %s (%ds)", frames[i%len(frames)], label, int(time.Since(start).Seconds()))
			select {
			case <-done:
				fmt.Fprint(s.ErrOut, "\r\x1b[K")
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			wg.Wait()
		})
	}
}
