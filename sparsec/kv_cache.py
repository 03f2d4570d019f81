"""Decoder LMs captured with a KV cache: one program for the prefill of S tokens and for one-token decode steps.

The cached program takes explicit past tensors and returns the present ones, the form that torch, ONNX Runtime and
TVM all run (no cache object, no in-place buffer mutation)::

    program(input_ids[B, S], logits_to_keep[K], past_keys=[keys_0[B, Hk, P, Dk], ...],
            past_values=[values_0[B, Hv, P, Dv], ...])
        -> (logits[B, K, V], present keys of every layer [B, Hk, P+S, Dk] ..., present values ...)

Its inputs are named ``input_ids``, ``logits_to_keep``, ``past_keys_{i}``, ``past_values_{i}`` (layer i).

``P`` (the cache length) may be 0: a prefill is the same program with empty pasts. ``logits_to_keep`` holds the
positions (0..S-1) whose logits are computed (Hugging Face's tensor form of ``logits_to_keep``): generation asks
for the last one only, so a prefill does not pay the LM head on every prompt token; perplexity asks for all.
Positions are ``P .. P+S-1``; every layer keeps all P tokens, and sliding-window layers (Mistral, Gemma 3) see only
their window through the causal mask, so one cache length serves every layer. Module paths are those of the
uncached capture (the model's own ``forward`` is traced), so targets, recipes and reports are unchanged.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass

import torch
from torch import nn

from sparsec.errors import SparsecError

INPUT_IDS, LOGITS_TO_KEEP = "input_ids", "logits_to_keep"
PAST = re.compile(r"past_(keys|values)_(\d+)$")  # a cache input: keys or values of layer i


@dataclass(frozen=True)
class CacheLayout:
    """The past tensors of a cached program, read from its input spec: per layer, the key and value shapes
    ``(heads, head_dim)``, their dtype, and the longest context (prompt + generated tokens) it accepts."""

    layers: int
    key_shapes: tuple[tuple[int, int], ...]
    value_shapes: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    max_context: int | None

    def past_names(self) -> list[str]:
        """The past inputs' names in input order: every layer's keys, then every layer's values."""
        return [f"past_{kind}_{i}" for kind in ("keys", "values") for i in range(self.layers)]

    def empty_past(self, batch: int = 1, device=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zero-length (keys, values) lists: the past of a prefill."""
        return tuple([torch.zeros(batch, h, 0, d, dtype=self.dtype, device=device) for h, d in shapes]
                     for shapes in (self.key_shapes, self.value_shapes))

    def bytes_per_token(self) -> int:
        """Cache bytes one token adds (all layers, keys and values, batch 1)."""
        elems = sum(h * d for h, d in (*self.key_shapes, *self.value_shapes))
        return elems * torch.empty((), dtype=self.dtype).element_size()


def cache_layout(spec: list[dict]) -> CacheLayout | None:
    """The layout of a cached program from its input spec (:func:`sparsec.artifact.input_spec`), None when the
    program takes no past tensors (an encoder, or a decoder captured without a cache)."""
    names = [s["name"] for s in spec]
    if INPUT_IDS not in names or LOGITS_TO_KEEP not in names:
        return None
    shapes: dict[tuple[str, int], tuple[int, int]] = {}
    dtype, max_context = None, None
    for s in spec:
        m = PAST.match(s["name"])
        if not m:
            continue
        heads, past, dim = s["shape"][1:]
        shapes[(m.group(1), int(m.group(2)))] = (heads, dim)
        dtype = getattr(torch, s["dtype"])
        if isinstance(past, dict) and past.get("max") is not None:
            max_context = past["max"] + 1
    layers = len(shapes) // 2
    if not layers or any((k, i) not in shapes for i in range(layers) for k in ("keys", "values")):
        return None
    return CacheLayout(layers, tuple(shapes[("keys", i)] for i in range(layers)),
                       tuple(shapes[("values", i)] for i in range(layers)), dtype, max_context)


def cached_output_names(layers: int) -> list[str]:
    """The outputs of a cached program with ``layers`` layers: logits, then every layer's keys, then values."""
    return ["logits", *(f"present_{kind}_{i}" for kind in ("keys", "values") for i in range(layers))]


def program_layout(program) -> CacheLayout | None:
    """:func:`cache_layout` of an ExportedProgram."""
    from sparsec.artifact import input_spec

    return cache_layout(input_spec(program))


def is_causal_lm(module) -> bool:
    """A Hugging Face model that generates text: it can ``generate`` and has an LM head (output embeddings)."""
    can = getattr(module, "can_generate", None)
    head = getattr(module, "get_output_embeddings", None)
    return bool(callable(can) and can() and callable(head) and head() is not None)


def _run_with_cache(model, input_ids: torch.Tensor, logits_to_keep: torch.Tensor, past_keys: list[torch.Tensor],
                    past_values: list[torch.Tensor], forward) -> tuple[torch.Tensor, ...]:
    """``forward`` of a Hugging Face causal LM on ``input_ids`` after the past: (logits, *keys, *values)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(past_keys, past_values)):
        cache.update(k, v, i)
    start = past_keys[0].shape[2]
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    out = forward(model, input_ids=input_ids, past_key_values=cache, use_cache=True, position_ids=positions,
                  logits_to_keep=logits_to_keep, return_dict=True)
    layers = out.past_key_values.layers
    return (out.logits, *(layer.keys for layer in layers), *(layer.values for layer in layers))


def default_max_context(config) -> int:
    """The model's maximum positions (``max_position_embeddings`` / ``n_positions``), at most 4096 by default."""
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, k, None), int)), 4096)
    return min(limit, 4096)


def cached_example_inputs(model, input_ids: torch.Tensor) -> tuple:
    """Example inputs of the cached program: the first half of ``input_ids`` (at least 2 rows and 4 tokens) run
    through ``model`` gives a real cache, the second half is the step's input; logits for its last two positions.
    Returns the program's positional inputs ``(input_ids, logits_to_keep, past_keys, past_values)``."""
    if input_ids.shape[0] < 2:
        input_ids = input_ids.repeat(2, 1)
    if input_ids.shape[1] < 4:
        input_ids = torch.cat([input_ids] * 4, dim=1)
    half = input_ids.shape[1] // 2
    with torch.no_grad():
        out = model(input_ids=input_ids[:, :half], use_cache=True, return_dict=True)
    layers = out.past_key_values.layers
    step = input_ids.shape[1] - half
    return (input_ids[:, half:].contiguous(), torch.arange(step - 2, step),
            [layer.keys.detach().clone() for layer in layers], [layer.values.detach().clone() for layer in layers])


def export_cached(model: nn.Module, example: tuple, max_context: int):
    """``torch.export`` the Hugging Face causal LM ``model`` as a cached program (see the module docstring): batch,
    step length S (1..max_context), cache length P (0..max_context-1) and the number of kept logits dynamic."""
    forward = type(model).forward

    def cached_forward(self, input_ids, logits_to_keep, past_keys, past_values):
        return _run_with_cache(self, input_ids, logits_to_keep, past_keys, past_values, forward)

    dynamic = cached_dynamic_shapes(len(example[2]), max_context)
    saved = model.config.use_cache
    model.forward = types.MethodType(cached_forward, model)  # the instance's forward: module paths stay the same
    try:
        return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)
    finally:
        del model.forward
        model.config.use_cache = saved


def cached_dynamic_shapes(layers: int, max_context: int) -> dict:
    """``dynamic_shapes`` of a cached program: batch, step length S (1..max_context), cache length P
    (0..max_context-1) and the number of kept logits."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=max_context)
    past_len = Dim("past", min=0, max=max_context - 1)
    kept = Dim("kept", min=1, max=max_context)
    return {INPUT_IDS: {0: batch, 1: seq}, LOGITS_TO_KEEP: {0: kept},
            "past_keys": [{0: batch, 2: past_len}] * layers, "past_values": [{0: batch, 2: past_len}] * layers}


class FullSequence(nn.Module):
    """A cached program seen as an uncached causal LM: ``view(input_ids, attention_mask=None) -> (logits,)`` with
    logits at every position, computed as a prefill against an empty cache. What calibration loops
    (``forward_loop(model)``), held-out measurement and perplexity call; ``attention_mask`` must be all ones
    (sparsec's loops pad nothing)."""

    def __init__(self, module: nn.Module, layout: CacheLayout):
        super().__init__()
        self.module = module
        self.layout = layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **ignored):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise SparsecError("a cached decoder program runs unpadded sequences only: give rows of equal length"
                               " (attention_mask all ones)")
        keys, values = self.layout.empty_past(input_ids.shape[0], input_ids.device)
        keep = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (self.module(input_ids, keep, keys, values)[0],)


def full_sequence_loop(forward_loop, layout: CacheLayout):
    """``forward_loop`` for a cached program: the loop sees the program as :class:`FullSequence`."""
    if forward_loop is None:
        return None

    def loop(model):
        return forward_loop(FullSequence(model, layout))

    for attr in ("samples", "tokens"):
        if hasattr(forward_loop, attr):
            setattr(loop, attr, getattr(forward_loop, attr))
    return loop
