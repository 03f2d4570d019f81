"""Backends lower a transformed program to a deployable form; one folder per backend.

- :mod:`sparsec.backends.onnxruntime`: ONNX export (``torch.onnx.export``, dynamo) and ONNX Runtime inference and
  verification against the torch reference.
"""
