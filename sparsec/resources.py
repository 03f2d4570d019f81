"""Memory budget: estimate what a transform needs before the long part starts, and refuse what cannot fit.

The estimate is parameter bytes + the peak bytes of live activations of one forward at the largest batch the run
feeds (computed from the captured graph: the shape of every node at that batch and sequence length, freed after its
last use, views free) + the calibration token ids held in memory. The budget is ``--max-memory`` or else the memory
available now (the system's, or the cgroup's limit when that is lower).
"""
from __future__ import annotations

import re

from sparsec.errors import SparsecError, UsageError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from ``8GiB``, ``512MiB``, ``2.5GB``, ``1000000`` (decimal units are powers of 1000, *iB of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        num, unit = text, ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"bad memory size {text!r}: expected a number with a unit, e.g. 8GiB, 512MiB or 2GB")
        num, unit = float(m.group(1)), m.group(2).lower()
    size = int(num * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"bad memory size {text!r}: it must be more than 0 bytes")
    return size


def human_size(n: int) -> str:
    """'1.50 GiB', '12.00 MiB', '3.25 KiB' or '100 B'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def available_memory() -> int:
    """Bytes this process can still allocate: the system's available memory, or the cgroup's room when lower."""
    import psutil

    free = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            free = min(free, max(0, int(limit) - usage))
    return free


def parameter_bytes(program) -> int:
    """Bytes of the parameters and buffers of an ExportedProgram (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*program.state_dict.values(), *program.constants.values()]:
        if hasattr(t, "untyped_storage") and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def _symbol_sizes(program, batch: int | None, seq: int | None) -> dict:
    """Symbol -> size: dim 0 of every user input is the batch, dim 1 of a dynamic one the sequence; other symbols
    keep the size they had in the example inputs."""
    import torch

    user = set(program.graph_signature.user_inputs)
    sizes = {}
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user or not isinstance(val, torch.Tensor):
            continue
        for i, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt):
                want = batch if i == 0 else seq if i == 1 else None
                if want is not None or d.node.hint is not None:
                    sizes[d.node.expr] = want if want is not None else d.node.hint
    return sizes


def _nbytes(val, sizes: dict) -> int:
    import torch

    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v, sizes) for v in val)
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for d in val.shape:
        numel *= _dim(d, sizes)
    return numel * val.element_size()


def _dim(d, sizes: dict) -> int:
    """A dim's size with the symbols set to ``sizes`` (a symbol not there: its size in the example inputs)."""
    import torch

    if not isinstance(d, torch.SymInt):
        return int(d)
    expr = d.node.expr.subs(sizes)
    if expr.is_number:
        return int(expr)
    return int(d.node.hint) if d.node.hint is not None else 1  # a data-dependent size: unknown before it runs


def _attention_scratch(node, sizes: dict) -> int:
    """The attention weights scaled_dot_product_attention may hold while it runs (its math kernel): B*H*Lq*Lk."""
    import torch

    if node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return 0
    q, k = (a.meta.get("val") for a in node.args[:2])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    return _nbytes(q, sizes) // _dim(q.shape[-1], sizes) * _dim(k.shape[-2], sizes)


def peak_activation_bytes(program, batch: int | None = None, seq: int | None = None) -> int:
    """The most bytes of activations alive at once when the graph runs at ``batch`` x ``seq`` (None: the example
    sizes): every node's output from its node to its last use (views allocate nothing), and the attention weights
    while an attention op runs."""
    import torch

    sizes = _symbol_sizes(program, batch, seq)
    user = set(program.graph_signature.user_inputs)
    nodes = list(program.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    live, peak, alive = 0, 0, {}
    for i, node in enumerate(nodes):
        if node.op == "placeholder" and node.name in user or node.op == "call_function" and not getattr(
                node.target, "is_view", False) and node.target is not torch.ops.aten._assert_scalar.default:
            alive[node] = _nbytes(node.meta.get("val"), sizes)
            live += alive[node]
            peak = max(peak, live + _attention_scratch(node, sizes))
        for arg in node.all_input_nodes:
            if last_use.get(arg) == i and arg in alive:
                live -= alive.pop(arg)
    return peak


def check_memory(program, *, budget: int | None, batch: int | None = None, seq: int | None = None,
                 token_bytes: int = 0, what: str = "") -> dict:
    """Raise a one-line SparsecError when the estimate exceeds ``budget`` (None: the memory available now).
    Returns the estimate: ``{"parameters", "activations", "tokens", "total", "budget"}`` in bytes."""
    params = parameter_bytes(program)
    acts = peak_activation_bytes(program, batch, seq)
    total = params + acts + token_bytes
    limit = budget if budget is not None else available_memory()
    estimate = {"parameters": params, "activations": acts, "tokens": token_bytes, "total": total, "budget": limit}
    if total > limit:
        shape = f" for {what}" if what else ""
        parts = f"parameters {human_size(params)} + peak activations {human_size(acts)}{shape}"
        if token_bytes:
            parts += f" + calibration tokens {human_size(token_bytes)}"
        have = (f"the budget is {human_size(limit)} (--max-memory)" if budget is not None else
                f"only {human_size(limit)} of memory is available")
        fix = "lower --batch-size, --seq-len or --calib-samples" if what else "use a smaller model"
        raise SparsecError(f"not enough memory: the transform needs about {human_size(total)} ({parts}) but {have};"
                           f" {fix}, or raise --max-memory if more memory can be used")
    return estimate
