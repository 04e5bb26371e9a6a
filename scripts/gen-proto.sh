#!/usr/bin/env bash
# Regenerates graph/onnxpb/onnx.pb.go from graph/onnxpb/onnx.proto with
# Debian's protoc and protoc-gen-go at the version go.mod pins.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "gen-proto.sh: protoc not found (apt-get install protobuf-compiler)" >&2; exit 1; }
pgv="$(go list -m -f '{{.Version}}' google.golang.org/protobuf)"
go install "google.golang.org/protobuf/cmd/protoc-gen-go@$pgv"
export PATH="$PATH:$(go env GOPATH)/bin"
(cd graph/onnxpb && go generate .)
