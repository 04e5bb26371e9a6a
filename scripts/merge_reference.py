#!/usr/bin/python3
"""Reference LoRA merge with plain onnx + numpy, for scripts/bench-merge.sh.

    /usr/bin/python3 scripts/merge_reference.py IN.onnx OUT.onnx

Reads an injected model (external data included), folds every adapter of the
onnxlora manifest into its base weight the way onnxlora merge does
(W += scaling/alpha * A @ B in float64, rounded once to the weight's type;
transposed for Gemm transB=1), removes the branch nodes and the adapter
initializers, restores the base node's output name, drops the manifest, and
saves with all tensors of 1 KiB or more in OUT.onnx.data.

It handles what the benchmark model has (weights that are initializers read
directly, not shared); it is a yardstick, not a second implementation.
Needs Debian's python3-onnx and python3-numpy (hence /usr/bin/python3).
"""

import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

MANIFEST_KEY = "onnxlora.adapters"


def merge(inp, out):
    model = onnx.load(inp)  # reads the external data too
    g = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    manifest = json.loads(meta[MANIFEST_KEY])
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    drop_nodes, drop_inits = set(), set()
    for a in manifest["adapters"]:
        base = nodes[a["node"]]
        alpha, trans_b = 1.0, False
        if base.op_type == "Gemm":
            for at in base.attribute:
                if at.name == "alpha":
                    alpha = at.f
                if at.name == "transB":
                    trans_b = at.i != 0
        w_proto = inits[a["weight"]]
        w = numpy_helper.to_array(w_proto)
        A = numpy_helper.to_array(inits[a["lora_A"]]).astype(np.float64)
        B = numpy_helper.to_array(inits[a["lora_B"]]).astype(np.float64)
        delta = (a["scaling"] / alpha) * (A @ B)
        if trans_b:
            delta = delta.T
        merged = (w.astype(np.float64) + delta).astype(w.dtype)
        w_proto.CopyFrom(numpy_helper.from_array(merged, a["weight"]))
        base.output[0] = a["output"]
        drop_nodes.update(a["nodes"])
        drop_inits.update([a["lora_A"], a["lora_B"], a["scaling_tensor"]])
    kept = [n for n in g.node if n.name not in drop_nodes]
    del g.node[:]
    g.node.extend(kept)
    kept = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(kept)
    props = [p for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(out) + ".data", size_threshold=1024)
    return len(manifest["adapters"])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    start = time.time()
    n = merge(sys.argv[1], sys.argv[2])
    print("BENCH_REFERENCE " + json.dumps({"seconds": time.time() - start, "adapters": n}))


if __name__ == "__main__":
    main()
