"""ONNX Runtime backend: export a sparsec artifact to ONNX, verify it against torch, run it.

``sparsec::`` custom ops are lowered to standard ONNX ops through one table,
:data:`sparsec.backends.onnxruntime.translations.TRANSLATIONS` (extend it with ``register_translation``).
"""
from sparsec.backends.onnxruntime.export import OnnxExport, export_onnx
from sparsec.backends.onnxruntime.runtime import compare_outputs, onnx_session, run_onnx, verify_onnx
from sparsec.backends.onnxruntime.translations import TRANSLATIONS, register_translation, translation_table

__all__ = ["OnnxExport", "export_onnx", "verify_onnx", "run_onnx", "onnx_session", "compare_outputs",
           "TRANSLATIONS", "register_translation", "translation_table"]
