#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing (scripts/setup.sh),
# checks formatting, generated code and vet, runs the tests, then the
# readers' fuzzers for a short fixed time.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh | tail -n 1)"
export ONNXLORA_ORT_LIB
# In this suite ONNX Runtime must be there: its tests fail rather than skip.
export ONNXLORA_REQUIRE_ORT=1
export PATH="$PATH:$(go env GOPATH)/bin"

unformatted="$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"
if [[ -n "$unformatted" ]]; then
	echo "test.sh: gofmt needed on: $unformatted" >&2
	exit 1
fi

# The committed Go types must match the schema.
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
protoc --go_out="$gen" --go_opt=paths=source_relative -I graph/onnxpb graph/onnxpb/onnx.proto
if ! cmp -s "$gen/onnx.pb.go" graph/onnxpb/onnx.pb.go; then
	echo "test.sh: graph/onnxpb/onnx.pb.go is stale: run scripts/gen-proto.sh" >&2
	exit 1
fi

go vet ./...
go test -count=1 ./...

fuzztime="${FUZZTIME:-15s}"
go test ./graph -run '^$' -fuzz '^FuzzLoad$' -fuzztime "$fuzztime"
go test ./export -run '^$' -fuzz '^FuzzSafetensorsRead$' -fuzztime "$fuzztime"
go test ./export -run '^$' -fuzz '^FuzzOnnxAdapterRead$' -fuzztime "$fuzztime"
go test ./export -run '^$' -fuzz '^FuzzPEFTConfig$' -fuzztime "$fuzztime"
go test ./train -run '^$' -fuzz '^FuzzReadJSONL$' -fuzztime "$fuzztime"
go test ./train -run '^$' -fuzz '^FuzzLoadCheckpoint$' -fuzztime "$fuzztime"
