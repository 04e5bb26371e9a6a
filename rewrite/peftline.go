package rewrite

import (
	"fmt"
	"strconv"
)

// TrainableLine is PEFT's print_trainable_parameters line, with its
// thousands separators: "trainable params: 2,048 || all params: 27,904 ||
// trainable%: 7.3394".
func TrainableLine(trainable, all int64) string {
	pct := 0.0
	if all > 0 {
		pct = 100 * float64(trainable) / float64(all)
	}
	return fmt.Sprintf("trainable params: %s || all params: %s || trainable%%: %.4f", thousands(trainable), thousands(all), pct)
}

// thousands formats n as Python's "{:,d}" does.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := len(s) > 0 && s[0] == '-'
	if neg {
		s = s[1:]
	}
	var b []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b = append(b, ',')
		}
		b = append(b, s[i])
	}
	if neg {
		return "-" + string(b)
	}
	return string(b)
}
