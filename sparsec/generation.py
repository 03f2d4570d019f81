"""Text generation: one loop over a backend-neutral step function.

A *stepper* owns a backend's KV cache (:mod:`sparsec.kv_cache`): ``stepper.reset()`` empties it and
``stepper.step(ids)`` runs the tokens ``ids`` (int64 ``[1, S]``) after the cache, appends their keys and values,
and returns the logits of the last position (float32 ``[V]``). The torch stepper is here; ONNX Runtime's and TVM's
live with their backends. The loop owns sampling, stopping and streaming: greedy by default; with ``do_sample``
the logits are divided by ``temperature``, cut to the ``top_k`` largest and the smallest set whose probability
reaches ``top_p``, and sampled from a ``torch.Generator`` seeded with ``seed`` (same seed, same tokens).
Timings: ``prefill_ms`` is the prompt's step; ``decode_ms`` one entry per generated token after the first
(the first token comes from the prefill's logits).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sparsec.errors import UsageError


@dataclass
class Generation:
    """What one generation produced and how long it took (milliseconds, wall clock)."""

    tokens: torch.Tensor  # int64 [1, S + N]: the prompt followed by the N generated tokens
    prompt_tokens: int
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)
    stopped_by: str = "max_new_tokens"  # or "eos"

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[0, self.prompt_tokens:]

    @property
    def decode_ms_per_token(self) -> float:
        """Median decode step (ms); 0 when no decode step ran."""
        return float(torch.tensor(self.decode_ms).median()) if self.decode_ms else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: 1000 / the median decode step."""
        ms = self.decode_ms_per_token
        return 1000.0 / ms if ms else 0.0


class TorchStepper:
    """Steps a cached program in torch: ``program`` is an ExportedProgram, or a module taking its inputs (e.g.
    :func:`sparsec.accelerate` of one) with its ``layout``; the cache is a list of tensors."""

    backend = "torch"

    def __init__(self, program, layout=None):
        from sparsec.kv_cache import program_layout

        self.layout = layout or program_layout(program)
        if self.layout is None:
            raise uncached_error("the program")
        self.module = program.module() if hasattr(program, "graph_signature") else program
        self._keep = torch.zeros(1, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.keys, self.values = self.layout.empty_past(1)

    @property
    def cache_length(self) -> int:
        return int(self.keys[0].shape[2])

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self._keep[0] = ids.shape[1] - 1
        out = self.module(ids, self._keep, self.keys, self.values)
        layers = self.layout.layers
        self.keys, self.values = list(out[1:1 + layers]), list(out[1 + layers:])
        return out[0][0, -1]


def uncached_error(what: str) -> UsageError:
    """The error for a model captured without a KV cache (or one that cannot generate)."""
    return UsageError(f"{what} takes no KV cache, so it cannot generate: generation needs a causal LM transformed"
                     " with a cache ('sparsec transform MODEL --kv-cache ...', then export or compile that"
                     " artifact); encoders and models without an LM head cannot generate")


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """The next token from last-position ``logits`` [V] (greedy unless ``do_sample``)."""
    if not do_sample or temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = no cut), got {top_k}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")


def run_generation(stepper, input_ids: torch.Tensor, *, max_new_tokens: int = 32, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                   eos_token_id: int | list[int] | None = None, ignore_eos: bool = False,
                   on_token: Callable[[int], None] | None = None, what: str = "the model") -> Generation:
    """Generate up to ``max_new_tokens`` after ``input_ids`` ([S] or [1, S]) with ``stepper``; stops at an EOS token
    unless ``ignore_eos``. ``on_token(token)`` is called as each token is chosen (streaming)."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise UsageError(f"input ids must be one non-empty sequence ([S] or [1, S]), got shape {list(ids.shape)}")
    limit = stepper.layout.max_context
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise UsageError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the"
                         f" maximum context of {what} ({limit} tokens): shorten the prompt or generate fewer tokens,"
                         " or re-run transform with a larger --max-context")
    eos = set() if ignore_eos or eos_token_id is None else set(
        [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    generator = torch.Generator().manual_seed(seed) if do_sample and seed is not None else None
    options = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    stepper.reset()
    start = time.perf_counter()
    logits = stepper.step(ids)
    token = sample_next(logits, **options)
    result = Generation(ids, ids.shape[1], (time.perf_counter() - start) * 1e3)
    new = [token]
    step_in = torch.empty(1, 1, dtype=torch.long)
    while True:
        if on_token is not None:
            on_token(token)
        if token in eos:
            result.stopped_by = "eos"
            break
        if len(new) == max_new_tokens:
            break
        step_in[0, 0] = token
        start = time.perf_counter()
        logits = stepper.step(step_in)
        token = sample_next(logits, **options)
        result.decode_ms.append((time.perf_counter() - start) * 1e3)
        new.append(token)
    result.tokens = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)
    return result


def open_stepper(model: Any, *, threads: int | None = None, sparse_kernel: str = "auto"):
    """A stepper for ``model``: an artifact directory (torch), a ``.onnx`` file (ONNX Runtime), a TVM build
    directory, or a loaded :class:`~sparsec.api.TransformResult`, :class:`~sparsec.artifact.Artifact` or
    ExportedProgram. Returns ``(stepper, info)``; info holds the EOS ids and the tokenizer directory when known."""
    from sparsec.artifact import Artifact

    info: dict = {"eos_token_id": None, "tokenizer": None}
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isfile(path) and path.endswith(".onnx"):
            from sparsec.backends.onnxruntime.generate import OrtStepper

            stepper = OrtStepper(path, threads=threads, sparse_kernel=sparse_kernel)
            info.update(stepper.generation_info())
            return stepper, info
        from sparsec.backends.tvm.build import is_build_dir

        if is_build_dir(path):
            from sparsec.backends.tvm.generate import TvmStepper

            stepper = TvmStepper(path, threads=threads)
            info.update(stepper.generation_info())
            return stepper, info
        from sparsec.api import load_artifact

        if not os.path.isdir(path):
            raise UsageError(f"model '{path}' is not an artifact directory, a .onnx file or a TVM build directory;"
                             " create one with 'sparsec transform MODEL --kv-cache -o OUT'")
        model = load_artifact(path)
    if isinstance(model, Artifact):
        info.update(model.manifest.get("generation", {}))
        tok = os.path.join(model.path, "tokenizer")
        info["tokenizer"] = tok if os.path.isdir(tok) else None
        model = model.program
    elif hasattr(model, "pipeline") and hasattr(model, "program"):  # a TransformResult
        info.update(model.generation or {})
        info["tokenizer"] = model.source.get("tokenizer")
        model = model.program
    if not hasattr(model, "graph_signature"):
        raise UsageError(f"cannot generate with a {type(model).__name__}: give an artifact directory, a .onnx file,"
                         " a TVM build directory, a TransformResult, an Artifact or an ExportedProgram")
    return TorchStepper(model), info


def generate(model: Any, input_ids: Any, max_new_tokens: int = 32, do_sample: bool = False, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None, ignore_eos: bool = False, threads: int | None = None,
             sparse_kernel: str = "auto") -> torch.Tensor:
    """Generate after ``input_ids`` ([S] or [1, S] token ids) with a cached model (see :func:`open_stepper`):
    returns int64 ``[1, S + N]``. Greedy unless ``do_sample``; stops at EOS (the model's, or ``eos_token_id``)
    unless ``ignore_eos``, else after ``max_new_tokens``."""
    stepper, info = open_stepper(model, threads=threads, sparse_kernel=sparse_kernel)
    return run_generation(stepper, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          eos_token_id=info["eos_token_id"] if eos_token_id is None else eos_token_id,
                          ignore_eos=ignore_eos).tokens
