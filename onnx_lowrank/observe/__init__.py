"""What the model does on calibration data: ONNX Runtime sessions, the calibration samples, each layer's
statistics, activations fetched from inside bodies, and the cache that keeps them between runs."""
