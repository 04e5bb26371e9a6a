package termsafe

import "testing"

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		"model.layers.0.q_proj":  "model.layers.0.q_proj",
		"naïve name with spaces": "naïve name with spaces",
		"evil\x1b[2Jname":        `"evil\x1b[2Jname"`,
		"two\nlines":             `"two\nlines"`,
		"tab\tin table":          `"tab\tin table"`,
		"bad\xffutf8":            `"bad\xffutf8"`,
	} {
		if got := Quote(in); got != want {
			t.Errorf("Quote(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestQuoteAll(t *testing.T) {
	type row struct {
		Name  string
		Via   []string
		inner string
	}
	type report struct {
		Rows []row
		P    *row
		M    map[string]string
	}
	r := &report{Rows: []row{{Name: "a\x07", Via: []string{"ok", "b\r"}, inner: "c\n"}}, P: &row{Name: "d\x1b"}, M: map[string]string{"k": "e\x00"}}
	QuoteAll(r)
	if r.Rows[0].Name != `"a\a"` || r.Rows[0].Via[0] != "ok" || r.Rows[0].Via[1] != `"b\r"` || r.P.Name != `"d\x1b"` || r.M["k"] != `"e\x00"` {
		t.Errorf("QuoteAll: %+v %+v %v", r.Rows, *r.P, r.M)
	}
	if r.Rows[0].inner != "c\n" {
		t.Error("an unexported field was changed")
	}
}

func TestEscape(t *testing.T) {
	for in, want := range map[string]string{
		"plain words":              "plain words",
		"module evil\x1b[31m: bad": `module evil\x1b[31m: bad`,
		"tab\there é":              `tab\there é`,
		"bad\xffbyte":              `bad\xffbyte`,
	} {
		if got := Escape(in); got != want {
			t.Errorf("Escape(%q) = %s, want %s", in, got, want)
		}
	}
}
