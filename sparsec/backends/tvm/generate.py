"""Text generation with a TVM build: the stepper of a compiled cached program (see :mod:`sparsec.generation`).

The KV cache never leaves TVM. A build with a ``decode`` function (:mod:`sparsec.backends.tvm.decode`, every build
of a cached program whose attention sparsec lowered) keeps it in buffers of a fixed capacity, written in place: a
step appends its keys and values and attends over the first ``P + S`` positions; nothing is copied or allocated
per step but the logits, and a full buffer is reallocated at twice the capacity (capped at the maximum context).
Otherwise each step runs ``main`` and passes its present tensors (TVM tensors) back as the next past. Token ids go
in and logits come out as zero-copy DLPack views. A one-token step runs sparsec's sparse GEMV behind every TEAL
threshold and the scheduled attention kernel (:mod:`sparsec.backends.tvm.attention`); a prompt of 16 tokens or more
runs the blocked dense GEMM, a shorter one the batched union path (:mod:`sparsec.backends.tvm.kernels`). Python's
share of a step (step() minus the bare VM call) is about 0.05 ms; measured decode times: ``benchmarks/
tvm_decode.py``.
"""
from __future__ import annotations

import os

import torch

#: first capacity of the in-place cache (tokens), doubled whenever a step needs more
START_CAPACITY = 256


class TvmStepper:
    """Steps the TVM build directory ``path`` of a cached program (``sparsec compile`` of an artifact from
    ``transform --kv-cache``). ``threads``: TVM's thread pool (default: the build's)."""

    backend = "tvm"

    def __init__(self, path: str, *, threads: int | None = None):
        from sparsec.backends.tvm.build import TOKENIZER_DIR, load_compiled, read_build_manifest
        from sparsec.backends.tvm.env import import_tvm
        from sparsec.generation import uncached_error
        from sparsec.kv_cache import cache_layout

        self.path = os.fspath(path)
        layout = cache_layout(read_build_manifest(self.path)["inputs"])
        if layout is None:
            raise uncached_error(f"'{self.path}'")
        self.layout = layout
        self.model = load_compiled(self.path, threads=threads, memory="naive")  # pooled: grows with the cache
        self._tvm = import_tvm()
        decode = self.model.manifest.get("decode")
        self._lengths = decode["lengths"] if decode else 0  # values of decode's past_length (0: run main)
        self._fn = self.model.vm["decode" if decode else "main"]
        self._params = list(self.model.params)
        self._keep_torch = torch.zeros(1, dtype=torch.long)  # logits_to_keep: the last position, S - 1
        self._keep_np = self._keep_torch.numpy()  # the same memory: numpy's item assignment is 20x torch's
        self._keep = self._tvm.runtime.from_dlpack(self._keep_torch)
        self._shape = self._tvm.runtime.ShapeTuple
        tok = os.path.join(self.path, TOKENIZER_DIR)
        self._tokenizer = tok if os.path.isdir(tok) else None
        self._cache, self._length, self._capacity = [], 0, 0
        self.reset()

    def _empty(self, tokens: int) -> list:
        """Uninitialised ``[1, H, tokens, D]`` tensors: every layer's keys, then every layer's values."""
        dtype = str(self.layout.dtype).removeprefix("torch.")
        return [self._tvm.runtime.empty((1, h, tokens, d), dtype, self.model.device)
                for shapes in (self.layout.key_shapes, self.layout.value_shapes) for h, d in shapes]

    def reset(self) -> None:
        """Empty the cache (an in-place cache keeps its buffers for the next generation)."""
        self._length = 0
        if not self._lengths:
            self._cache = self._empty(0)

    @property
    def cache_length(self) -> int:
        """Tokens in the cache."""
        return self._length if self._lengths else int(self._cache[0].shape[2])

    @property
    def capacity(self) -> int:
        """Tokens the in-place cache holds before it is reallocated (the cache length when ``main`` runs)."""
        return self._capacity if self._lengths else self.cache_length

    def _reserve(self, tokens: int) -> None:
        """Make the in-place cache hold ``tokens`` positions, keeping the cached ones (one copy per doubling)."""
        if tokens <= self._capacity:
            return
        size = max(tokens, START_CAPACITY, 2 * self._capacity)
        if self.layout.max_context is not None:
            size = max(tokens, min(size, self.layout.max_context))
        new = self._empty(size)
        for old, buf in zip(self._cache, new):
            torch.from_dlpack(buf)[:, :, :self._length].copy_(torch.from_dlpack(old)[:, :, :self._length])
        self._cache, self._capacity = new, size

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` (int64 ``[1, S]``) after the cache and append their keys and values; the logits of the last
        position (float32 ``[V]``, a view of TVM's output)."""
        if not ids.is_contiguous() or ids.data_ptr() % 64:  # TVM takes 64-byte aligned DLPack tensors only
            ids = ids.clone(memory_format=torch.contiguous_format)
        tokens = ids.shape[1]
        self._keep_np[0] = tokens - 1
        if self._lengths:
            if self._length + tokens > self._capacity:
                self._reserve(self._length + tokens)
            # torch ids in, torch logits out: TVM's FFI converts both through DLPack without a copy
            out = self._fn(ids, self._keep_torch, *self._cache, self._shape([self._length] * self._lengths),
                           *self._params)
            self._length += tokens
            return out[0].view(-1)  # [1, 1, V]: one kept position
        out = self._fn(self._tvm.runtime.from_dlpack(ids), self._keep, *self._cache, *self._params)
        self._cache = list(out[1:])  # TVM tensors, passed back as they are
        return torch.from_dlpack(out[0])[0, -1]

    def _args(self, ids) -> list:
        """The VM function's arguments for the token ids ``ids`` (a TVM tensor) after the cache as it is now."""
        if self._lengths:
            return [ids, self._keep, *self._cache, self._shape([self._length] * self._lengths), *self._params]
        return [ids, self._keep, *self._cache, *self._params]

    def generation_info(self) -> dict:
        """``{"eos_token_id", "max_context" (tokens), "tokenizer" (the build's ``tokenizer/`` folder, or None)}``."""
        info = self.model.manifest.get("generation") or {}
        return {"eos_token_id": info.get("eos_token_id"), "max_context": self.layout.max_context,
                "tokenizer": self._tokenizer}
