package graph

import (
	"math"

	"golang.org/x/sys/unix"
)

// physicalMemory is the machine's RAM plus swap.
func physicalMemory() int64 {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return math.MaxInt64
	}
	total := (uint64(si.Totalram) + uint64(si.Totalswap)) * uint64(si.Unit)
	if total == 0 || total > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(total)
}
