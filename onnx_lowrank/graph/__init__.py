"""The ONNX graph: reading and writing models, constant weights, control-flow bodies, the factorizable
layers (one adapter per op) and the splice that writes a factor chain in a layer's place."""
