#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, and nothing twice:
# Debian's python3-onnx (onnx.checker and the reference merge script),
# python3-flatbuffers (reads .onnx_adapter files onnxlora writes, as a second
# implementation),
# libonnx-testdata (round-trip models), protobuf-compiler and protoc-gen-go
# (to check the generated Go types are current), graphviz (to render the
# inspect --dot goldens), the ONNX Runtime library
# (scripts/install-ort.sh) and the Go modules.
# Prints `export ONNXLORA_ORT_LIB=...` as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in python3-onnx python3-numpy python3-flatbuffers libonnx-testdata protobuf-compiler graphviz; do
	dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "setup.sh: missing Debian packages: ${need[*]} (run as root or apt-get install them)" >&2
		exit 1
	fi
	echo "setup.sh: installing ${need[*]}" >&2
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

# protoc-gen-go at the version go.mod pins for the runtime.
gobin="$(go env GOPATH)/bin"
pgv="$(go list -m -f '{{.Version}}' google.golang.org/protobuf)"
if ! "$gobin/protoc-gen-go" --version 2>/dev/null | grep -q "$pgv"; then
	echo "setup.sh: installing protoc-gen-go $pgv" >&2
	go install "google.golang.org/protobuf/cmd/protoc-gen-go@$pgv" >&2
fi

go mod download >&2
lib="$(scripts/install-ort.sh | tail -n 1)"
echo "export ONNXLORA_ORT_LIB=$lib"
