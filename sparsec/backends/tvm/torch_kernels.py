"""sparsec's TVM kernels in plain PyTorch: the ``sparsec::tvm_linear`` op and :func:`accelerate_program`.

:func:`accelerate_program` returns the module of a sparsec program (its ``ExportedProgram.module()``) in which every
linear layer with constant weights calls ``sparsec::tvm_linear``, routed exactly as the TVM lowering routes it
(:func:`sparsec.backends.tvm.lower.input_kind`): behind ``sparsec::threshold`` the sparse kernel with the threshold
fused (the thresholded tensor is never made), behind a relufy activation the sparse kernel skipping zero inputs,
anywhere else the dense kernel of the same family (``sparse=False``: dense everywhere). Every other op stays a torch
op.

The op's CPU implementation calls the compiled TIR kernel (:func:`sparsec.backends.tvm.kernels.linear_kernel`) with
the torch tensors themselves: tvm_ffi takes a ``torch.Tensor`` argument through DLPack (torch's
``__dlpack_c_exchange_api__``) as a view of the same memory, so nothing is copied — the kernel reads the activation,
the packed weight and the bias where torch keeps them and writes its result into a ``torch.empty`` output. Weights
are packed once (:func:`sparsec.backends.tvm.kernels.pack_weight`) into buffers of the module (``sparsec_tvm.*``);
the original weights are dropped unless another op still reads them (tied embeddings). Thresholds stay the teal
buffers they were. A kernel is compiled once per (K, N, dtype, kind, schedule) — the schedule ``sparsec compile``
would give it on this CPU from the tuning database (:mod:`sparsec.backends.tvm.tuning`), else the default — and its
library cached in ``~/.cache/sparsec/tvm-kernels/`` (compiling takes 0.5-1 s, loading the library milliseconds).

The op has a fake kernel, so the module exports with ``torch.export``; it has no autograd formula (inference only).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from sparsec.errors import SparsecError

#: Kernels by input kind, as :func:`sparsec.backends.tvm.lower.input_kind` names them.
KINDS = ("threshold", "sparse", "dense")
STORE = "sparsec_tvm"  # the submodule holding the packed weights and biases
_KERNELS: dict[tuple, object] = {}
_SCHEDULERS: dict[int, object] = {}  # TVM threads -> the tuning database's Scheduler (read once per process)
_NO_THRESHOLD: dict[torch.dtype, Tensor] = {}


def kernel_schedule(k: int, n: int, dtype: str, kind: str, threads: int | None = None) -> dict:
    """``linear_kernel``'s schedule arguments (tiles, rows per pass, GEMM group, splits) for this kernel on ``threads``
    threads (default: TVM's pool size now): the tuning database's for this CPU (:mod:`sparsec.backends.tvm.tuning`,
    as ``sparsec compile`` reads it; nothing is measured here), else the kernels' defaults."""
    from sparsec.backends.tvm.env import num_threads
    from sparsec.backends.tvm.tuning import Scheduler

    threads = threads or num_threads()
    if threads not in _SCHEDULERS:
        _SCHEDULERS[threads] = Scheduler(0, threads)
    return _SCHEDULERS[threads](k, n, dtype, kind)


def linear_kernel_fn(k: int, n: int, dtype: str, kind: str, tiles: int, threads: int | None = None):
    """The compiled kernel (a tvm_ffi Function ``(x, Wp, thr, bias, y)``) for ``kind`` and a weight packed in
    ``tiles`` tiles, with :func:`kernel_schedule`'s rows per pass, group and splits when its tiles are these (else
    the defaults): built once per process, its library cached on disk (:func:`kernel_library`)."""
    key = (k, n, dtype, kind, tiles)
    if key not in _KERNELS:  # (every call of the op comes here: the schedule is looked up once)
        from sparsec.backends.tvm.env import import_tvm
        from sparsec.backends.tvm.kernels import R

        schedule = kernel_schedule(k, n, dtype, kind, threads)
        if schedule["tiles"] != tiles:
            schedule = {"rows_per_pass": R, "group": None, "splits": 1}
        full = key + (schedule["rows_per_pass"], schedule["group"], schedule["splits"])
        path = kernel_library(*full)
        if not path.is_file():
            _build_library(full, path)
        _KERNELS[key] = import_tvm().runtime.load_module(str(path))["main"]
    return _KERNELS[key]


def kernel_library(k: int, n: int, dtype: str, kind: str, tiles: int, rows_per_pass: int,
                   group: int | None, splits: int) -> Path:
    """Where the kernel's library is cached: ``$SPARSEC_CACHE/tvm-kernels/`` (default ~/.cache/sparsec), named by
    its shape and schedule and a hash of the kernel source, the TVM version and the CPU, so any change builds a new
    one."""
    from sparsec.backends.tvm import kernels
    from sparsec.backends.tvm.env import host_cpu, import_tvm
    from sparsec.models import cache_dir

    h = hashlib.sha256(Path(kernels.__file__).read_bytes())
    h.update(f"{import_tvm().__version__} {host_cpu()}".encode())
    name = f"linear-{kind}-{k}x{n}-{dtype}-{tiles}t-r{rows_per_pass}-g{group or 0}-s{splits}-{h.hexdigest()[:16]}.so"
    return cache_dir() / "tvm-kernels" / name


def _build_library(key: tuple, path: Path) -> None:
    """Compile the kernel ``key`` for this CPU and write its library to ``path`` atomically."""
    from sparsec.backends.tvm.env import cpu_target, import_tvm
    from sparsec.backends.tvm.kernels import linear_kernel

    k, n, dtype, kind, tiles, rows_per_pass, group, splits = key
    f = linear_kernel(k, n, dtype, sparse=kind != "dense", threshold=kind == "threshold", tiles=tiles,
                      rows_per_pass=rows_per_pass, group=group, splits=splits)
    executable = import_tvm().compile(f.with_attr("global_symbol", "main"), cpu_target())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, path)  # atomic: concurrent builders each write their own temporary
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.library.custom_op("sparsec::tvm_linear", mutates_args=(), device_types="cpu")
def tvm_linear(x: Tensor, weight: Tensor, bias: Tensor, threshold: Tensor | None, kind: str) -> Tensor:
    """``x' @ W.T + bias`` by sparsec's TVM kernel for ``kind`` (one of :data:`KINDS`); ``x' = x * (|x| > threshold)``
    for ``'threshold'`` (a 0-d tensor), else ``x``. ``weight``: W packed by ``pack_weight`` ``[tiles, K, CT]``."""
    k, n = weight.shape[1], bias.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # a view when x is contiguous
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    if threshold is None:
        thr = _NO_THRESHOLD.setdefault(x.dtype, torch.zeros(1, dtype=x.dtype))
    else:
        thr = threshold.reshape(1).to(x.dtype)
    kernel = linear_kernel_fn(k, n, str(x.dtype).removeprefix("torch."), kind, weight.shape[0])
    kernel(x2, weight, thr, bias, y)  # torch tensors go in as DLPack views: y is written in place
    return y.reshape(*x.shape[:-1], n)


@tvm_linear.register_fake
def _tvm_linear_fake(x: Tensor, weight: Tensor, bias: Tensor, threshold: Tensor | None, kind: str) -> Tensor:
    torch._check(kind in KINDS, lambda: f"sparsec::tvm_linear: kind must be one of {KINDS}, got {kind!r}")
    return x.new_empty(*x.shape[:-1], bias.shape[0])


#: The OpOverload in graphs (``torch.ops.sparsec.tvm_linear.default``).
TVM_LINEAR = torch.ops.sparsec.tvm_linear.default


def accelerate_program(program, *, threads: int | None = None, sparse: bool = True) -> torch.nn.Module:
    """The module of ``program`` (an ExportedProgram) with its linear layers on sparsec's TVM kernels (module
    docstring). ``threads``: TVM's pool size (default: as it is, all CPUs unless set before); ``sparse=False``: the
    dense kernel everywhere. Linear layers whose weight depends on the model inputs stay torch ops."""
    from sparsec.backends.tvm.env import import_tvm, num_threads
    from sparsec.backends.tvm.kernels import DTYPES, pack_weight
    from sparsec.backends.tvm.lower import LINEAR_OPS, Constants, input_kind, linear_operands
    from sparsec.graph import module_path
    from sparsec.training import trainable

    import_tvm(threads)
    threads = threads or num_threads()
    consts = Constants(program)
    originals = {n.name: n for n in program.graph.nodes}
    gm = program.module()
    nodes = {n.name: n for n in gm.graph.nodes}  # the same names as in program.graph, but for the user inputs
    nodes.update(zip(program.graph_signature.user_inputs, [n for n in gm.graph.nodes if n.op == "placeholder"]))
    if not hasattr(gm, STORE):  # (a program exported from an accelerated module has one already)
        gm.add_module(STORE, torch.nn.Module())
    store = gm.get_submodule(STORE)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or str(node.target) not in LINEAR_OPS:
            continue
        x_node, w, b_node = linear_operands(originals[node.name], consts)
        if w is None:
            continue
        dtype = str(node.meta["val"].dtype).removeprefix("torch.")
        where = module_path(node) or node.name
        if dtype not in DTYPES:
            raise SparsecError(f"linear layer '{where}' computes in {dtype}; sparsec's TVM kernels take"
                               f" {', '.join(DTYPES)}: convert the model (e.g. model.float()) before sparsec transform")
        kind = input_kind(x_node) if sparse else "dense"
        name = where.replace(".", "_")
        while hasattr(store, f"{name}_weight"):  # one module called twice
            name += "_"
        n = int(w.shape[0])
        tiles = kernel_schedule(int(w.shape[1]), n, dtype, kind, threads)["tiles"]
        bias = consts.get(b_node) if b_node is not None else torch.zeros(n)
        store.register_buffer(f"{name}_weight", pack_weight(w, dtype, tiles=tiles))
        store.register_buffer(f"{name}_bias", bias.detach().to(getattr(torch, dtype)).contiguous())
        linear_kernel_fn(int(w.shape[1]), n, dtype, kind, tiles, threads)  # compile now, not at the first call
        x = nodes[x_node.name]  # in gm: x, or the threshold(x, t) fused into the kernel
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{STORE}.{name}_weight")
            bias = gm.graph.get_attr(f"{STORE}.{name}_bias")
            new = gm.graph.call_function(TVM_LINEAR, (x.args[0], weight, bias, x.args[1], kind) if kind == "threshold"
                                         else (x, weight, bias, None, kind))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()  # fused thresholds, the weights' get_attr and what computed constant weights
    _drop_unused_state(gm)
    gm.recompile()
    return trainable(gm)  # .eval() / .train() are accepted (the graph does not change with the mode)


def _drop_unused_state(gm) -> None:
    """Delete the parameters and buffers of ``gm`` that no ``get_attr`` node reads any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters(remove_duplicate=False)] + [k for k, _ in gm.named_buffers(
            remove_duplicate=False)]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)
