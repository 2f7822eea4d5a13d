"""Quantization of the result, validated together with the factorization: int8 and its fallback, and the
tolerance they share."""
