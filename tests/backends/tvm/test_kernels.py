"""sparsec's TIR linear kernels, built with the real TVM for this CPU, against a numpy fp32 reference.

Shapes are not multiples of the column tile; inputs cover sparsity 0 / 0.5 / 0.9, all-zero and batch > 1 (the union
path, and the blocked GEMM from GEMM_ROWS rows on, rows not a multiple of its micro-kernel's). That the sparse kernel
really skips weight rows is checked with NaN in the rows of zero inputs: skipped rows never reach the output, so it
stays finite, while the dense kernel of the same family turns NaN.
"""
import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.env import cpu_target  # noqa: E402
from sparsec.backends.tvm.kernels import (GEMM_ROWS, MAX_TILE, VL, linear_kernel, num_tiles,  # noqa: E402
                                          pack_weight, reference, tile_width)

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float16": dict(rtol=2e-3, atol=2e-3),
       "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}
_CACHE = {}


def _kernel(k, n, dtype, sparse, threshold, tiles=None, splits=1):
    key = (k, n, dtype, sparse, threshold, tiles, splits)
    if key not in _CACHE:
        f = linear_kernel(k, n, dtype, sparse=sparse, threshold=threshold, tiles=tiles, splits=splits).with_attr(
            "global_symbol", "main")
        _CACHE[key] = tvm.compile(f, cpu_target())["main"]
    return _CACHE[key]


def _input(m, k, sparsity, dtype, g):
    x = torch.randn(m, k, generator=g)
    for row in x:
        row[torch.randperm(k, generator=g)[:round(sparsity * k)]] = 0
    return x.to(getattr(torch, dtype))


def _run(k, n, dtype, sparse, x, w, b, thr=None, tiles=None, splits=1):
    td = getattr(torch, dtype)
    y = torch.full((x.shape[0], n), float("nan"), dtype=td)
    t = torch.tensor([0.0 if thr is None else thr], dtype=td)
    _kernel(k, n, dtype, sparse, thr is not None, tiles, splits)(x, pack_weight(w, tiles=tiles), t, b, y)
    return y


def _check(y, x, w, b, dtype, thr=None):
    want = reference(x.float(), w.float(), thr, b.float())
    torch.testing.assert_close(y.float(), torch.from_numpy(want).to(getattr(torch, dtype)).float(), **TOL[dtype])


@pytest.mark.parametrize("dtype,k,n,tiles,splits", [
    ("float32", 100, 300, None, 1), ("float32", 256, 128, 1, 1), ("float32", 37, 300, 3, 1),
    ("float16", 100, 300, None, 1), ("bfloat16", 100, 300, None, 1),
    ("float32", 100, 300, 1, 2), ("float16", 100, 300, 2, 2), ("float32", 37, 300, 3, 4)])  # 37 x 0.9: 1 pass, 4 tasks
def test_sparse_and_dense_match_reference(dtype, k, n, tiles, splits):
    g = torch.Generator().manual_seed(0)
    td = getattr(torch, dtype)
    w, b = torch.randn(n, k, generator=g).to(td), torch.randn(n, generator=g).to(td)
    for sparse in (True, False):
        for m, s in [(1, 0.0), (1, 0.5), (1, 0.9), (3, 0.5), (5, 0.9), (GEMM_ROWS, 0.5), (GEMM_ROWS + 21, 0.0)]:
            x = _input(m, k, s, dtype, g)
            _check(_run(k, n, dtype, sparse, x, w, b, tiles=tiles, splits=splits), x, w, b, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_threshold_matches_reference(dtype):
    k, n = 100, 300
    g = torch.Generator().manual_seed(1)
    td = getattr(torch, dtype)
    w, b = torch.randn(n, k, generator=g).to(td), torch.zeros(n, dtype=td)
    for m in (1, 4, 6, GEMM_ROWS + 1):
        x = _input(m, k, 0.0, dtype, g)
        for thr in (0.0, 0.67, 10.0):  # nothing dropped (no exact zeros) / about half / everything
            y = _run(k, n, dtype, True, x, w, b, thr)
            _check(y, x, w, b, dtype, thr)
            if thr == 10.0:
                assert torch.equal(y, torch.zeros_like(y))


def test_all_zero_input_gives_the_bias_exactly():
    k, n = 100, 300
    w, b = torch.randn(n, k), torch.randn(n)
    for m in (1, 5, GEMM_ROWS):
        for sparse in (True, False):
            for splits in (1, 2):
                y = _run(k, n, "float32", sparse, torch.zeros(m, k), w, b, splits=splits)
                assert torch.equal(y, b.expand(m, n))


@pytest.mark.parametrize("m,splits", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_sparse_kernel_never_reads_rows_of_zero_inputs(m, splits):
    k, n = 100, 300
    g = torch.Generator().manual_seed(2)
    x = _input(m, k, 0.5, "float32", g)
    x[:, :8] = 1.0  # active in every row; the union of the block is x's nonzero columns
    dead = (x == 0).all(dim=0)
    w, b = torch.randn(n, k, generator=g), torch.zeros(n)
    w_nan = w.clone()
    w_nan[:, dead] = float("nan")
    y = _run(k, n, "float32", True, x, w_nan, b, splits=splits)
    assert torch.isfinite(y).all()
    _check(y, x, w, b, "float32")
    assert torch.isnan(_run(k, n, "float32", False, x, w_nan, b, splits=splits)).all()


def test_pack_weight_pads_the_last_tile_with_zeros():
    w = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    wp = pack_weight(w, tiles=2)
    assert tuple(wp.shape) == (2, 3, 32)  # 20 columns per tile, rounded up to a multiple of VL = 16
    assert torch.equal(wp[0], w[:32].T) and torch.equal(wp[1, :, :8], w[32:].T)
    assert torch.equal(wp[1, :, 8:], torch.zeros(3, 24))


def test_one_tile_per_thread_unless_a_tile_would_be_too_wide():
    assert num_tiles(11008, threads=2) == 2 and tile_width(11008, 2) == 5504
    assert num_tiles(4096, threads=2) == 2 and num_tiles(4096, threads=16) == 16
    assert num_tiles(2 * MAX_TILE + 1, threads=2) == 4  # a multiple of the thread count
    assert num_tiles(VL, threads=8) == 1  # never narrower than one vector
    assert num_tiles(300) == num_tiles(300, threads=tvm.get_global_func("runtime.NumThreads")())


def test_a_tile_split_in_fewer_than_one_task_is_refused():
    with pytest.raises(ValueError, match="^splits must be at least 1, got 0$"):
        linear_kernel(100, 300, splits=0)
