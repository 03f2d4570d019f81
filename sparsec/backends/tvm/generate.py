"""Text generation with a TVM build: the stepper of a compiled cached program (see :mod:`sparsec.generation`).

The KV cache never leaves TVM: each step passes the previous step's present keys and values (TVM tensors returned
by the VM) back as the past inputs, the token ids go in and the logits come out as zero-copy DLPack views of torch
tensors, so no step copies the cache (the program's own concat of past and new keys is the only copy). A one-token
step runs sparsec's sparse GEMV behind every TEAL threshold and the scheduled attention kernel over the cache
(:mod:`sparsec.backends.tvm.attention`); a prompt of several tokens runs the batched (dense-cost) kernel path.
"""
from __future__ import annotations

import os

import torch


class TvmStepper:
    """Steps the TVM build directory ``path`` of a cached program (``sparsec compile`` of an artifact from
    ``transform --kv-cache``). ``threads``: TVM's thread pool (default: the build's)."""

    backend = "tvm"

    def __init__(self, path: str, *, threads: int | None = None):
        from sparsec.backends.tvm.build import TOKENIZER_DIR, load_compiled, read_build_manifest
        from sparsec.generation import uncached_error
        from sparsec.kv_cache import cache_layout

        self.path = os.fspath(path)
        layout = cache_layout(read_build_manifest(self.path)["inputs"])
        if layout is None:
            raise uncached_error(f"'{self.path}'")
        self.layout = layout
        self.model = load_compiled(self.path, threads=threads)
        from sparsec.backends.tvm.env import import_tvm

        self._tvm = import_tvm()
        self._main = self.model.vm["main"]
        self._params = list(self.model.params)
        self._keep_torch = torch.zeros(1, dtype=torch.long)  # logits_to_keep: the last position, S - 1
        self._keep = self._tvm.runtime.from_dlpack(self._keep_torch)
        tok = os.path.join(self.path, TOKENIZER_DIR)
        self._tokenizer = tok if os.path.isdir(tok) else None
        self.reset()

    def reset(self) -> None:
        """Empty the cache: zero-length past tensors ``[1, H, 0, D]``."""
        dtype = str(self.layout.dtype).removeprefix("torch.")
        dev = self.model.device
        self._past = [self._tvm.runtime.empty((1, h, 0, d), dtype, dev)
                      for shapes in (self.layout.key_shapes, self.layout.value_shapes) for h, d in shapes]

    @property
    def cache_length(self) -> int:
        """Tokens in the cache."""
        return int(self._past[0].shape[2])

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (int64 ``[1, S]``) after the cache and append their keys and values; the logits of the last
        position (float32 ``[V]``, a view of TVM's output)."""
        ids = ids if ids.is_contiguous() else ids.contiguous()
        self._keep_torch[0] = ids.shape[1] - 1
        out = self._main(self._tvm.runtime.from_dlpack(ids), self._keep, *self._past, *self._params)
        self._past = list(out[1:])
        return torch.from_dlpack(out[0])[0, -1]

    def generation_info(self) -> dict:
        """``{"eos_token_id", "max_context" (tokens), "tokenizer" (the build's ``tokenizer/`` folder, or None)}``."""
        info = self.model.manifest.get("generation") or {}
        return {"eos_token_id": info.get("eos_token_id"), "max_context": self.layout.max_context,
                "tokenizer": self._tokenizer}
