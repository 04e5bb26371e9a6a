package train

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzReadJSONL checks that no input makes reading, validating or batching
// panic, and that errors stay one line.
func FuzzReadJSONL(f *testing.F) {
	for _, s := range []string{
		"{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4]}\n",
		"{\"input_ids\": [1, 2], \"attention_mask\": [1, 0], \"labels\": [-100, 2]}\n",
		"{\"input_ids\": [[1]]}\n", "[]\n", "{}\n", "\n\n", "{\"input_ids\": [1e400]}",
		"{\"input_ids\": [1, 2], \"position_ids\": [0, 1]}\n{\"input_ids\": [3], \"position_ids\": [0]}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := ReadJSONL(bytes.NewReader(data), "f.jsonl")
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error %q", err)
			}
			return
		}
		s := lmSpec()
		if err := d.Validate(s); err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error %q", err)
			}
			return
		}
		idx := make([]int, len(d.Rows))
		for i := range idx {
			idx[i] = i
		}
		if _, err := d.MakeBatch(idx, s); err != nil {
			t.Fatalf("validated rows do not batch: %v", err)
		}
	})
}

// FuzzLoadCheckpoint feeds damaged checkpoint bytes to the reader.
func FuzzLoadCheckpoint(f *testing.F) {
	var buf bytes.Buffer
	buf.WriteString(checkpointMagic)
	f.Add(buf.Bytes())
	f.Add([]byte(checkpointMagic + "\x10\x00\x00\x00\x00\x00\x00\x00{\"params\":[]}   "))
	f.Add([]byte(checkpointMagic + "\x20\x00\x00\x00\x00\x00\x00\x00{\"params\":[{\"name\":\"a\",\"len\":9}]}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = readCheckpoint(bytes.NewReader(data), int64(len(data)))
	})
}
