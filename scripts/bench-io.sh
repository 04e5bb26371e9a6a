#!/bin/sh
# Benchmark onnxlora's file commands against cp of the same files, for the
# four model shapes of the I/O issue, each in one run per round:
#
#   scripts/bench-io.sh                   # all four (needs ~25 GB in $WORK)
#   scripts/bench-io.sh ext-200M inline-200M
#
# Shapes (Llama-shaped float16, all seven projections of every layer
# adapted at r=16, random non-zero A and B; rewrite/bench_io_test.go):
#   ext-200M     ~222 MB, weights in model.onnx.data
#   ext-3G       ~3.1 GB, weights in model.onnx.data
#   inline-200M  ~222 MB, weights inside model.onnx
#   inline-1G    ~1.09 GB float16, weights inside model.onnx
#
# Each round, from a warm page cache and with `sync` inside every timing
# (so each contestant pays for getting its output to disk), it times:
#   cp        cp -r of the injected model's folder
#   inject    onnxlora inject --target all 7 projections -r 16 (of the base)
#   merge     onnxlora merge (of the injected model)
#   adapter   onnxlora merge BASE --adapter DIR (PEFT dir from export-adapter)
#   inspect   onnxlora inspect (of the injected model)
#   python    /usr/bin/python3 scripts/merge_reference.py (onnx + numpy)
# and prints, per round, seconds, ratios to cp and peak RSS (/usr/bin/time
# -v); then the median and range of every ratio over the rounds. The
# machine is shared and its page cache noisy: read the spread too.
#
# This is a benchmark: CI never runs it. Rounds: $ONNXLORA_BENCH_RUNS
# (default 3). Work files: $ONNXLORA_BENCH_WORK (default /tmp/onnxlora-io),
# removed at the end unless ONNXLORA_BENCH_KEEP=1.
set -eu
cd "$(dirname "$0")/.."
SHAPES="${*:-ext-200M inline-200M inline-1G ext-3G}"
WORK="${ONNXLORA_BENCH_WORK:-/tmp/onnxlora-io}"
RUNS="${ONNXLORA_BENCH_RUNS:-3}"
PYTHON=/usr/bin/python3
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "bench-io: $TIME not found (apt-get install time)" >&2; exit 1; }
mkdir -p "$WORK"
# ONNXLORA_BENCH_BIN and ONNXLORA_BENCH_TEST name prebuilt binaries
# (the onnxlora command and `go test -c ./rewrite`) instead.
BIN="${ONNXLORA_BENCH_BIN:-$WORK/onnxlora}"
TESTBIN="${ONNXLORA_BENCH_TEST:-$WORK/rewrite.test}"
[ -n "${ONNXLORA_BENCH_BIN:-}" ] || go build -o "$BIN" ./cmd/onnxlora
[ -n "${ONNXLORA_BENCH_TEST:-}" ] || go test -c -o "$TESTBIN" ./rewrite
TARGETS=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj

# run NAME CMD...: prints "seconds maxrss_kib" of CMD followed by sync; its
# CPU seconds (user + system) go to $d/NAME.cpu.
run() {
	name=$1
	shift
	sync
	$TIME -v -o "$d/$name.time" sh -c '"$@" >/dev/null && sync' sh "$@" 2>"$d/$name.err" || {
		cat "$d/$name.err" "$d/$name.time" >&2
		exit 1
	}
	awk -F': ' '/User time|System time/ { c += $2 } END { print c }' "$d/$name.time" >>"$d/$name.cpu"
	awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; t = s }
		/Maximum resident set size/ { r = $2 } END { print t, r }' "$d/$name.time"
}

for shape in $SHAPES; do
	layout=${shape%%-*}
	size=${shape#*-}
	d="$WORK/$shape"
	rm -rf "$d"
	mkdir -p "$d"
	inline=0
	[ "$layout" = inline ] && inline=1
	ONNXLORA_BENCH_GEN="$d" ONNXLORA_BENCH_SIZE="$size" ONNXLORA_BENCH_INLINE=$inline \
		"$TESTBIN" -test.run '^TestBenchGenerateBase$' >"$d/generate.log" 2>&1 || { cat "$d/generate.log" >&2; exit 1; }
	"$BIN" export-adapter "$d/injected/model.onnx" -o "$d/peft" >/dev/null
	bytes=$(cat "$d"/injected/model.onnx* | wc -c)
	cat "$d"/base/* "$d"/injected/* >/dev/null # warm the page cache
	echo "== $shape (load average $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs): injected model $(echo "$bytes" | awk '{ printf "%.0f MB", $1 / 1e6 }'), RSS limit 0.25x + 64 MiB = $(echo "$bytes" | awk '{ printf "%.0f MiB", $1 / 4 / 1048576 + 64 }')"
	printf '%-5s %7s | %14s %14s %14s %14s %14s %14s\n' round cp_s inject merge adapter inspect python "(ratio, MiB)"
	: >"$d/ratios"
	i=0
	while [ "$i" -lt "$RUNS" ]; do
		i=$((i + 1))
		rm -rf "$d/out" && mkdir -p "$d/out"
		set -- $(run cp cp -r "$d/injected" "$d/out/copy"); cp_s=$1
		rm -rf "$d/out/copy"
		set -- $(run inject "$BIN" inject "$d/base/model.onnx" --target "$TARGETS" -r 16 --alpha 32 -o "$d/out/inj.onnx"); inj="$1 $2"
		rm -f "$d"/out/inj.onnx*
		set -- $(run merge "$BIN" merge "$d/injected/model.onnx" -o "$d/out/merged.onnx"); mrg="$1 $2"
		rm -f "$d"/out/merged.onnx*
		set -- $(run adapter "$BIN" merge "$d/base/model.onnx" --adapter "$d/peft" -o "$d/out/adapter.onnx"); adp="$1 $2"
		rm -f "$d"/out/adapter.onnx*
		set -- $(run inspect "$BIN" inspect "$d/injected/model.onnx"); ins="$1 $2"
		py="- -"
		if [ "$layout" = ext ] || [ "${ONNXLORA_BENCH_PY_INLINE:-1}" = 1 ]; then
			set -- $(run python "$PYTHON" scripts/merge_reference.py "$d/injected/model.onnx" "$d/out/py.onnx"); py="$1 $2"
			rm -f "$d"/out/py.onnx*
		fi
		echo "$cp_s $inj $mrg $adp $ins $py" >>"$d/ratios"
		echo "$i $cp_s $inj $mrg $adp $ins $py" | awk '{
			printf "%-5s %6.2fs |", $1, $2
			for (k = 3; k <= 11; k += 2) if ($k == "-") printf " %14s", "-"; else printf " %6.2fx %5.0fM", $k / $2, $(k + 1) / 1024
			printf "\n" }'
	done
	# Median and range of each ratio over the rounds.
	for col in 2 4 6 8 10; do
		awk -v c="$col" '$(c) != "-" { print $(c) / $1 }' "$d/ratios" | sort -n | awk -v c="$col" '
			{ v[NR] = $1 } END { if (NR == 0) exit; split("inject merge adapter inspect python", n, " ");
			printf "  %-8s median %5.2fx cp (range %.2f-%.2f)\n", n[c / 2], v[int((NR + 1) / 2)], v[1], v[NR] }'
	done
	awk '{ for (c = 3; c <= 11; c += 2) if ($(c) != "-" && $(c) > m[c]) m[c] = $(c) } END {
		printf "  peak RSS MiB: inject %.0f, merge %.0f, adapter %.0f, inspect %.0f, python %.0f\n", m[3] / 1024, m[5] / 1024, m[7] / 1024, m[9] / 1024, m[11] / 1024 }' "$d/ratios"
	# CPU seconds tell CPU-bound from I/O-bound runs on a busy machine.
	printf '  median CPU s (user+sys):'
	for name in cp inject merge adapter inspect python; do
		[ -f "$d/$name.cpu" ] && printf ' %s %s' "$name" "$(sort -n "$d/$name.cpu" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
	done
	echo
	[ "${ONNXLORA_BENCH_KEEP:-}" = 1 ] || rm -rf "$d"
done
