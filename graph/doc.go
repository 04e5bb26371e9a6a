// Package graph loads, edits and saves ONNX models.
//
// A Model wraps the protobuf ModelProto together with the folder its external
// data lives in. Loading is lossless (fields unknown to this schema survive a
// round trip) and lazy: tensors stored in external data files are read only
// when asked for, so inspecting a multi-gigabyte model reads only its protobuf.
//
// A Graph indexes one GraphProto: the producer and consumers of every value,
// initializers and Constant nodes by name, and the subgraphs held in node
// attributes (If, Loop, Scan, and contrib ops such as BeamSearch). Edits are
// plain changes to the protobuf followed by Reindex, in the spirit of
// onnx-graphsurgeon: add or remove nodes, replace a value's uses, then
// Toposort.
//
// Tensor data is read and written through typed views (Float64s, Float32s,
// SetFloat64s) that understand FLOAT, FLOAT16, BFLOAT16 and DOUBLE in raw_data
// or the typed fields, and round to nearest even when narrowing.
package graph
