"""Threshold ties: a backend's threshold decisions against torch's.

A TEAL / CATS threshold (``sparsec::threshold``, ``sparsec::threshold_prefill``) is a discontinuity: an activation
whose magnitude lies within ~1e-6 (relative) of its threshold ``t`` is kept by one implementation and dropped by the
other when the ops before it round differently (a backend's summation order differs from torch's kernels by ~1e-7
relative), and the flipped element moves every later token and layer (the real Gemma 3 270M after teal 0.5 in ONNX
Runtime: two such decisions, 8e-8 and 1.6e-6 from t, give 8.0 max abs diff in the logits; after attention, whose
softmax and value sums round differently again, one o_proj input decided 3.9e-6 from t). Such a backend is right:
run with the backend's own decisions, torch matches it within 1e-4. :func:`run_with_decisions` runs the torch program
with given decisions; :func:`compare_decisions` says which of a backend's decisions differ from torch's and how far
from ``t`` they lie (a *tie*: at most :data:`TIE` relative).
"""
from __future__ import annotations

from typing import Callable

#: relative distance ``|(|x| - t)| / |t|`` up to which a backend and torch may decide a threshold differently
TIE = 1e-5


def threshold_nodes(program) -> list:
    """The ``sparsec::threshold`` / ``sparsec::threshold_prefill`` nodes of ``program`` (ExportedProgram), in order."""
    from sparsec.ops import THRESHOLD, THRESHOLD_PREFILL

    return [n for n in program.graph.nodes if n.op == "call_function" and n.target in (THRESHOLD, THRESHOLD_PREFILL)]


def run_with_decisions(program, inputs: dict, decide: Callable, module=None) -> list:
    """The torch ``program`` on ``inputs`` (arrays or tensors by input name) with the elements ``keep`` kept at
    every threshold node, ``keep = decide(node, x, t, own, passed)``: ``own`` is torch's own keep mask (``|x| > t``,
    or True where a ``threshold_prefill`` passes the token), ``passed`` those passed positions (None for
    ``threshold``). Returns the outputs (``x * keep`` is what the ops compute with ``keep = own``, bit for bit).
    ``module``: ``program.module()`` when the caller has it."""
    import numpy as np
    import torch

    from sparsec.ops import THRESHOLD, _keep

    class Decide(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op != "call_function" or n.target not in nodes:
                return super().run_node(n)
            args = self.fetch_args_kwargs_from_env(n)[0]
            x, t = args[:2]
            if n.target is THRESHOLD:
                return x * decide(n, x, t, x.abs() > t, None)
            passed = _keep(torch.zeros_like(x), t.abs(), args[2])  # 0 > |t| nowhere: only the passed tokens
            return x * decide(n, x, t, _keep(x, t, args[2]), passed)

    nodes = set(n.target for n in threshold_nodes(program))
    args = [v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
            for v in (inputs[name] for name in program.graph_signature.user_inputs)]
    with torch.no_grad():
        return list(Decide(module if module is not None else program.module()).run(*args))


def compare_decisions(program, inputs: dict, decisions: dict, module=None) -> tuple[list, dict]:
    """(outputs, differ): the torch ``program`` run on ``inputs`` with a backend's ``decisions`` (``{threshold node
    name: its keep mask}``, bool arrays; a threshold without one keeps torch's own decisions). ``differ``: for each
    threshold where they differ from torch's (positions where an ``attention_mask`` input is 0 left out: a padded
    query's output is undefined), ``{"module", "t", "count", "distance"}``, ``distance`` the largest
    ``|(|x| - t)| / |t|`` of the differing elements (torch's x); thresholds of one input with equal t (Gemma's
    gate/up) decide the same elements: only the first is listed."""
    import numpy as np
    import torch

    from sparsec.graph import module_path

    mask = inputs.get("attention_mask")
    mask = torch.as_tensor(np.asarray(mask)).bool() if mask is not None else None
    differ: dict[str, dict] = {}
    seen: dict[tuple, str] = {}

    def decide(node, x, t, own, passed):
        if node.name not in decisions:
            return own
        keep = torch.as_tensor(np.asarray(decisions[node.name]))
        if keep.shape != x.shape:
            raise ValueError(f"decisions of {node.name} have shape {tuple(keep.shape)}, its input {tuple(x.shape)}")
        flipped = keep != own
        if mask is not None and x.shape[:2] == mask.shape:
            flipped &= mask.view(*mask.shape, *[1] * (x.dim() - 2))
        if flipped.any() and seen.setdefault((node.args[0], float(t)), node.name) == node.name:
            distance = ((x.abs() - t).abs() / t.abs())[flipped]
            differ[node.name] = {"module": module_path(node), "t": float(t), "count": int(flipped.sum()),
                                 "distance": float(distance.max())}
        return keep

    return run_with_decisions(program, inputs, decide, module), differ
