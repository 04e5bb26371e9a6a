package autodiff

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/onnxlora/onnxlora/internal/testutil"
)

// The op table in docs/autodiff.md lists exactly the ops with a rule.
func TestOpTableInDocs(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(testutil.RepoRoot(), "docs", "autodiff.md"))
	if err != nil {
		t.Fatal(err)
	}
	start := strings.Index(string(data), "<!-- op table -->")
	end := strings.Index(string(data), "<!-- end op table -->")
	if start < 0 || end < start {
		t.Fatal("docs/autodiff.md has no op table markers")
	}
	row := regexp.MustCompile("(?m)^\\| `([A-Za-z.]+)` \\|")
	var documented []string
	for _, m := range row.FindAllStringSubmatch(string(data[start:end]), -1) {
		documented = append(documented, m[1])
	}
	sort.Strings(documented)
	if got, want := strings.Join(documented, " "), strings.Join(Ops(), " "); got != want {
		t.Errorf("docs/autodiff.md op table:\n  %s\nrules:\n  %s", got, want)
	}
}
