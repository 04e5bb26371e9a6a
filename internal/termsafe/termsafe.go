// Package termsafe makes names read from a model safe to print on a
// terminal: a name holding control characters (an escape sequence, a
// newline, a tab that would break a table) is printed Go-quoted instead, so
// it can neither rewrite the screen nor pass for other output.
package termsafe

import (
	"reflect"
	"strconv"
	"unicode"
	"unicode/utf8"
)

// Quote returns s unchanged when every rune is printable (spaces
// included), else s quoted with its control characters escaped.
func Quote(s string) string {
	for _, r := range s {
		if r == unicode.ReplacementChar || (!unicode.IsPrint(r) && r != ' ') {
			return strconv.Quote(s)
		}
	}
	return s
}

// QuoteAll applies Quote to every string reachable from v (a pointer to a
// struct, slice or map of report values), in place, for a text rendering
// of a report. Map keys are left as they are.
func QuoteAll(v any) { quoteValue(reflect.ValueOf(v), 0) }

func quoteValue(v reflect.Value, depth int) {
	if depth > 64 {
		return
	}
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			quoteValue(v.Elem(), depth+1)
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				quoteValue(v.Field(i), depth+1)
			}
		}
	case reflect.Slice, reflect.Array:
		for i := 0; i < v.Len(); i++ {
			quoteValue(v.Index(i), depth+1)
		}
	case reflect.Map:
		for _, k := range v.MapKeys() {
			e := v.MapIndex(k)
			if e.Kind() == reflect.String {
				v.SetMapIndex(k, reflect.ValueOf(Quote(e.String())).Convert(e.Type()))
				continue
			}
			c := reflect.New(e.Type()).Elem()
			c.Set(e)
			quoteValue(c, depth+1)
			v.SetMapIndex(k, c)
		}
	case reflect.String:
		if v.CanSet() {
			v.SetString(Quote(v.String()))
		}
	}
}

// Escape returns s with each control character (and each byte that is not
// UTF-8) written as a Go escape, \x1b or \n, and everything else as is:
// for a line of text that mixes names with other words.
func Escape(s string) string {
	clean := true
	for _, r := range s {
		if r == unicode.ReplacementChar || (!unicode.IsPrint(r) && r != ' ') {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b []byte
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && n <= 1) || (!unicode.IsPrint(r) && r != ' ') {
			q := strconv.Quote(s[i : i+n])
			b = append(b, q[1:len(q)-1]...)
		} else {
			b = append(b, s[i:i+n]...)
		}
		i += n
	}
	return string(b)
}
