"""The activation-sparse linear kernel for NVIDIA GPUs (TVM CUDA codegen), and what a CUDA build and run need.

Layout: ``Wt [Kp, Np]`` (``W.T`` padded with zero rows/columns to the tiling, packed once at build time). Grid
``(Np / (TX*V), KS)``: block ``(bx, ks)`` owns ``TX*V`` output columns and ``Kp / KS`` input rows; each thread keeps
``V`` fp32 accumulators and reads one 16-byte vector of a weight row per active input, so a zero input's row is
never fetched (the test is uniform across the block: no divergence). The split-K partials go to a ``[KS, Np]``
scratch buffer that a second kernel sums (no atomics) and adds the bias. Rows of ``x`` (tokens) are processed one
after another. With ``gpu=False`` the same index arithmetic runs as serial loops on the CPU, which is how the
numerics are checked on machines without a GPU.
"""
from __future__ import annotations

import ctypes.util
import math
import shutil

from sparsec.errors import SparsecError

KS = 16  # split-K factor
TX = 64  # threads per block along N


def lanes(dtype: str) -> int:
    """Elements per 16-byte load."""
    return 4 if dtype == "float32" else 8


def padded(k: int, n: int, dtype: str) -> tuple[int, int]:
    """(Kp, Np): K rounded up to a multiple of KS, N to a multiple of TX * lanes."""
    step = TX * lanes(dtype)
    return math.ceil(k / KS) * KS, math.ceil(n / step) * step


def pack_weight_cuda(w, dtype: str | None = None):
    """``W [N, K]`` (torch) -> ``Wt [Kp, Np]`` in ``dtype`` (default: w's), zero-padded."""
    import torch

    dtype = dtype or str(w.dtype).removeprefix("torch.")
    n, k = w.shape
    kp, np_ = padded(k, n, dtype)
    wt = torch.zeros(kp, np_, dtype=getattr(torch, dtype))
    wt[:k, :n] = w.detach().T
    return wt


def cuda_linear_kernel(k: int, n: int, dtype: str = "float32", *, threshold: bool = False, gpu: bool = True):
    """A PrimFunc ``(x [M, K], Wt [Kp, Np], thr [1], bias [N], y [M, N])``: ``y = x' @ W.T + bias`` with
    ``x' = x * (|x| > thr)`` when ``threshold`` else ``x``, skipping the weight rows of zero ``x'`` entries."""
    from tvm.script import tirx as T

    v = lanes(dtype)
    kp, np_ = padded(k, n, dtype)
    nbx, kb = np_ // (TX * v), kp // KS
    f32 = "float32"
    zero = T.cast(0, dtype)
    bind = T.thread_binding if gpu else (lambda extent, thread=None: T.serial(extent))

    def active(xi, t):
        return T.abs(xi) > t if threshold else xi != zero

    @T.prim_func(private=True)
    def f(x_h: T.handle, wt: T.Buffer((kp, np_), dtype), thr: T.Buffer((1,), dtype), b: T.Buffer((n,), dtype),
          y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        part = T.alloc_buffer((KS, np_), f32)
        for row in range(m):
            for bx in bind(nbx, thread="blockIdx.x"):
                for ks in bind(KS, thread="blockIdx.y"):
                    for tx in bind(TX, thread="threadIdx.x"):
                        acc = T.decl_buffer((v,), f32, scope="local")
                        for j in T.unroll(v):
                            acc[j] = T.float32(0)
                        for i in range(kb):
                            xi = T.if_then_else(ks * kb + i < k, x[row, T.min(ks * kb + i, k - 1)], zero)
                            if active(xi, thr[0]):
                                for j in T.vectorized(v):
                                    acc[j] = acc[j] + T.cast(wt[ks * kb + i, (bx * TX + tx) * v + j], f32) * T.cast(
                                        xi, f32)
                        for j in T.unroll(v):
                            part[ks, (bx * TX + tx) * v + j] = acc[j]
            for b2 in bind(np_ // 256, thread="blockIdx.x"):
                for t2 in bind(256, thread="threadIdx.x"):
                    s = T.decl_buffer((1,), f32, scope="local")
                    s[0] = T.float32(0)
                    for ks in range(KS):
                        s[0] = s[0] + part[ks, b2 * 256 + t2]
                    if b2 * 256 + t2 < n:
                        y[row, b2 * 256 + t2] = T.cast(s[0] + T.cast(b[T.min(b2 * 256 + t2, n - 1)], f32), dtype)

    return f.with_attr("tirx.is_scheduled", True) if gpu else f


def cuda_target(arch: str = "sm_90"):
    """The TVM CUDA target for ``arch`` (given explicitly: without it TVM guesses sm_50, which nvcc 13 rejects)."""
    from sparsec.backends.tvm.env import import_tvm

    return import_tvm().target.Target({"kind": "cuda", "arch": arch})


def require_nvcc() -> str:
    """The path of nvcc; building for CUDA compiles the generated source with it, to catch errors at build time."""
    path = shutil.which("nvcc")
    if path is None:
        raise SparsecError("--target cuda needs the CUDA compiler nvcc, which is not on PATH: install the CUDA"
                           " toolkit (or add its bin/ directory to PATH), or use --target llvm")
    return path


def require_gpu() -> None:
    """Running a CUDA build needs the NVIDIA driver library and a visible GPU; say which one is missing."""
    if ctypes.util.find_library("cuda") is None:
        raise SparsecError("running a CUDA build needs the NVIDIA driver (libcuda.so.1 was not found): run it on a"
                           " machine with an NVIDIA GPU and driver, or compile with --target llvm for this CPU")
    from sparsec.backends.tvm.env import import_tvm

    if not import_tvm().cuda(0).exist:
        raise SparsecError("running a CUDA build needs an NVIDIA GPU, and the driver sees none (tvm.cuda(0) does"
                           " not exist): check nvidia-smi and CUDA_VISIBLE_DEVICES, or compile with --target llvm")


def cuda_sources(module) -> list[str]:
    """The CUDA C sources inside a compiled module (they nest: VM executable -> host -> cuda)."""
    from tvm.runtime.executable import Executable

    module = module.mod if isinstance(module, Executable) else module
    found = [module.inspect_source("cuda")] if module.kind == "cuda" else []
    for sub in module.imports:
        found += cuda_sources(sub)
    return found


def nvcc_compile(source: str, arch: str = "sm_90") -> bytes:
    """Compile CUDA ``source`` with nvcc to a cubin for ``arch`` (no GPU needed)."""
    from tvm.support import nvcc

    require_nvcc()
    with cuda_target(arch):  # compile_cuda reads Target.current() even with arch given
        return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc"))
