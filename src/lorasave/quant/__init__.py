"""Quantized weights: reading quantized bases (dequantize to float32) and writing quantized outputs."""
