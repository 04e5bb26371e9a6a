#!/bin/sh
# Regenerate the ONNX test models in testdata/models/ and the gradient, training
# and fine-tuning reference files in testdata/grad/, testdata/train/ and
# testdata/data/ (deterministic: re-running gives byte-identical files). Needs Debian's python3-torch and python3-onnx,
# hence /usr/bin/python3 rather than whatever python3 is first on PATH.
#
# Optional ONNX Runtime check of every generated model: point ORT_NODE_BINDING
# (or --ort-binding) at onnxruntime-node's native binding, e.g.
#   tar xzf onnxruntime-node-1.30.0.tgz -C /tmp/ort package/bin/napi-v6/linux/x64
#   ORT_NODE_BINDING=/tmp/ort/package/bin/napi-v6/linux/x64/onnxruntime_binding.node scripts/gen-testdata.sh
# (requires `node` on PATH; libonnxruntime.so.1 must sit next to the binding).
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-/usr/bin/python3}"
exec "$PYTHON" -B testdata/models/generate.py "$@"
