"""Judging a candidate model: the evaluator that runs it on held-out samples, the metrics and what they
promise for new inputs, latency, ONNX Runtime's fusions."""
