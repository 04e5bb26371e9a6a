package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/inspect"
)

func TestInspectAdapterFile(t *testing.T) {
	r := mustRun(t, "inspect", filepath.Join(adaptersTestdata, "adapter1.onnx_adapter"), "--json")
	var rep inspect.AdapterFileReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	if len(rep.Modules) != 2 || rep.Modules[0].Rank != 4 || rep.Modules[0].In != 8 || rep.Modules[1].Out != 5 || rep.Modules[0].DeltaNorm <= 0 {
		t.Errorf("modules %+v", rep.Modules)
	}
	// Found by content too, whatever the extension.
	tmp := t.TempDir()
	data, err := os.ReadFile(filepath.Join(adaptersTestdata, "adapter1.onnx_adapter"))
	if err != nil {
		t.Fatal(err)
	}
	renamed := filepath.Join(tmp, "adapter.bin")
	if err := os.WriteFile(renamed, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := mustRun(t, "inspect", renamed); !strings.Contains(r.stdout, "LoRA modules (2)") {
		t.Errorf("text report: %s", r.stdout)
	}
	trunc := filepath.Join(tmp, "t.onnx_adapter")
	if err := os.WriteFile(trunc, data[:len(data)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	r = run(t, "inspect", trunc)
	if r.code != 1 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, "onnx adapter") {
		t.Errorf("truncated: exit %d, stderr %q", r.code, r.stderr)
	}
	if r := run(t, "inspect", trunc, "--dot"); r.code != 2 {
		t.Errorf("--dot on an adapter: exit %d", r.code)
	}
}
