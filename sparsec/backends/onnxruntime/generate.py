"""Text generation with ONNX Runtime: the stepper of a cached ONNX export (see :mod:`sparsec.generation`).

The KV cache stays in ONNX Runtime's buffers: through IO binding each step feeds the previous step's
``present_*`` outputs (OrtValues) back as the ``past_*`` inputs, the token ids are bound from their tensor's memory
and the logits come back as a torch view of ONNX Runtime's output, so no step copies the cache through numpy (the
graph's own Concat of past and new keys is the only copy). The outputs are re-bound unallocated every step: their
cache dim grows, and ORT refuses a pre-allocated output of another shape. Python overhead per token beside
``run_with_iobinding``: 0.15-0.45 ms (2 to 4 layers, a loaded 2-core machine), under 1% of a decode step of a 1024-hidden 4-layer Llama.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import torch

from sparsec.errors import UsageError

#: the ONNX metadata key of a cached export's generation facts (JSON: eos_token_id, max_context in tokens)
GENERATION_KEY = "sparsec.generation"


class OrtStepper:
    """Steps a cached ONNX export (``sparsec export ART --to onnx`` of an artifact from ``transform --kv-cache``).

    ``threads``: ONNX Runtime intra-op threads (default: all CPUs; inter-op: 1). ``sparse_kernel``: the kernels were
    chosen at export (``--sparse-kernel``); ``none`` never registers sparsec's custom-op library (a model that uses
    it then fails to load), any other mode registers it when the model needs it, as ``sparsec run`` does."""

    backend = "onnxruntime"

    def __init__(self, path: str, *, threads: int | None = None, sparse_kernel: str = "auto"):
        from sparsec.backends.onnxruntime.export import tokenizer_path
        from sparsec.backends.onnxruntime.runtime import onnx_session
        from sparsec.backends.onnxruntime.sparse import MODES
        from sparsec.generation import uncached_error
        from sparsec.inputs import onnx_input_spec
        from sparsec.kv_cache import cache_layout, cached_output_names

        if sparse_kernel not in MODES:
            raise UsageError(f"sparse kernel '{sparse_kernel}' is not one of {', '.join(MODES)}")
        self.path = os.fspath(path)
        self.session = onnx_session(self.path, threads=threads or os.cpu_count(), inter_op=1,
                                    custom_ops=False if sparse_kernel == "none" else None)
        layout = cache_layout(onnx_input_spec(self.session))
        outputs = [o.name for o in self.session.get_outputs()]
        if layout is None:
            raise uncached_error(f"'{self.path}'")
        if outputs != cached_output_names(layout.layers):
            raise UsageError(f"'{self.path}' takes past keys and values but its outputs are not logits,"
                             " present_keys_{i}, present_values_{i}: re-export the artifact with this sparsec"
                             " ('sparsec export ART --to onnx')")
        meta = self.session.get_modelmeta().custom_metadata_map
        self._info = json.loads(meta.get(GENERATION_KEY) or "{}")
        self.layout = replace(layout, max_context=self._info.get("max_context", layout.max_context))
        self._outputs = outputs
        self._past_names = [n.replace("present_", "past_", 1) for n in outputs[1:]]
        tok = tokenizer_path(self.path)
        self._tokenizer = tok if os.path.isdir(tok) else None
        self._dtype = torch.empty(0, dtype=self.layout.dtype).numpy().dtype
        self._keep = np.zeros(1, np.int64)  # logits_to_keep: the last position of the step
        self._binding = self.session.io_binding()
        self.reset()

    def reset(self) -> None:
        """Empty the cache (length 0: the next step is a prefill)."""
        from onnxruntime import OrtValue

        shapes = (*self.layout.key_shapes, *self.layout.value_shapes)
        self._past = [OrtValue.ortvalue_from_numpy(np.zeros((1, h, 0, d), self._dtype)) for h, d in shapes]

    @property
    def cache_length(self) -> int:
        """Tokens in the cache."""
        return int(self._past[0].shape()[2])

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the tokens ``ids`` (int64 ``[1, S]``) after the cache and append their keys and values; returns the
        last position's logits (float32 ``[V]``, a view of ONNX Runtime's output buffer)."""
        ids = np.ascontiguousarray(torch.as_tensor(ids, dtype=torch.long).numpy())
        self._keep[0] = ids.shape[1] - 1
        b = self._binding
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("logits_to_keep", self._keep)
        for name, value in zip(self._past_names, self._past):
            b.bind_ortvalue_input(name, value)
        b.clear_binding_outputs()  # unallocated outputs: the present shapes grow every step
        for name in self._outputs:
            b.bind_output(name, "cpu")
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        self._past = out[1:]
        return torch.from_numpy(out[0].numpy())[0, -1]

    def generation_info(self) -> dict:
        """``{"eos_token_id", "max_context" (tokens), "tokenizer" (the ``NAME.tokenizer/`` folder beside the model,
        or None)}`` from the export's metadata."""
        return {"eos_token_id": self._info.get("eos_token_id"), "max_context": self.layout.max_context,
                "tokenizer": self._tokenizer}
