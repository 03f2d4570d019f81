"""sparsec's TIR kernels for quantized weights (int8 / int4, per channel or group-wise), built with the real TVM for
this CPU, against the torch reference ``linear(x', dequantize(q, scale))``.

Covers one-token decode (sparse, fused threshold, dense), the few-row and GEMM paths (M > 1), shapes whose column
count is not a multiple of the tile, several tiles, and that a skipped input skips its weights: NaN scales on the
groups of zero inputs (int8 per channel: every weight of a zero row set to a value that would change the output)
never reach the output of the sparse kernel.
"""
import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.env import cpu_target  # noqa: E402
from sparsec.backends.tvm.quantized import (MAX_TILE, num_splits, num_tiles, pack_quantized,  # noqa: E402
                                            quantized_linear_kernel, tile_width)
from sparsec.ops import DEQUANTIZE  # noqa: E402
from sparsec.passes.quantize import quantize_weight  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)
_CACHE = {}


def _kernel(k, n, bits, group, sparse, threshold, tiles=None, splits=1, scale_dtype="float32", offsets=False):
    key = (k, n, bits, group, sparse, threshold, tiles, splits, scale_dtype, offsets)
    if key not in _CACHE:
        f = quantized_linear_kernel(k, n, bits, group, sparse=sparse, threshold=threshold, tiles=tiles,
                                    splits=splits, scale_dtype=scale_dtype, offsets=offsets)
        _CACHE[key] = tvm.compile(f.with_attr("global_symbol", "main"), cpu_target())["main"]
    return _CACHE[key]


def _weights(k, n, bits, group, g, scale_dtype=torch.float32, symmetric=True):
    """(q, scale, bias, offset): offset None when ``symmetric``; else the weights lie around 0.3, not 0, so the
    offsets matter."""
    w = torch.randn(n, k, generator=g) + (0.0 if symmetric else 0.3)
    q, s, o = quantize_weight(w, bits, group, scale_dtype, symmetric=symmetric)
    return q, s, torch.randn(n, generator=g), o


def _input(m, k, sparsity, g):
    x = torch.randn(m, k, generator=g)
    for row in x:
        row[torch.randperm(k, generator=g)[:round(sparsity * k)]] = 0
    return x


def _run(x, q, s, b, bits, group, sparse, thr=None, tiles=None, splits=1, o=None):
    n = q.shape[0]
    k = x.shape[1]
    wq, sp = pack_quantized(q, s, bits, offset=o, tiles=tiles)
    y = torch.full((x.shape[0], n), float("nan"))
    kernel = _kernel(k, n, bits, group, sparse, thr is not None, tiles, splits, str(s.dtype).removeprefix("torch."),
                     o is not None)
    kernel(x, wq, sp, torch.tensor([thr or 0.0]), b, y)
    return y


def _reference(x, q, s, b, bits, group, thr=None, o=None):
    xt = x * (x.abs() > thr) if thr is not None else x
    y = torch.nn.functional.linear(xt, DEQUANTIZE(q, s, bits, group, torch.float32, o), b)
    return y, y.abs().max()


@pytest.mark.parametrize("bits,group,k,n,tiles,splits,scales,symmetric", [
    (8, 0, 96, 300, None, 1, "float32", True), (8, 32, 128, 200, None, 2, "float16", True),
    (4, 32, 128, 300, None, 1, "float32", True), (4, 16, 64, 100, 3, 3, "float16", True),
    (4, 0, 96, 64, 1, 2, "float32", True), (8, 16, 64, 300, 4, 1, "float32", True),
    (8, 0, 200, 300, 1, 2, "float16", True), (4, 32, 128, 300, None, 2, "float16", False),
    (4, 0, 96, 64, 1, 2, "float32", False), (8, 16, 64, 300, 4, 1, "float32", False)])
def test_matches_dequantize_then_linear(bits, group, k, n, tiles, splits, scales, symmetric):
    """Every path (M = 1 sparse / threshold / dense, M = 3, M = 20) equals the torch reference to fp32 rounding,
    relative to the output's scale; with the rows split between tasks too (``splits``: per channel the row passes,
    group-wise the groups, 3 parts of 4 groups unevenly), fp32 and fp16 scales, with and without offsets."""
    g = torch.Generator().manual_seed(bits * 100 + group)
    q, s, b, o = _weights(k, n, bits, group, g, getattr(torch, scales), symmetric)
    for m, sparsity in [(1, 0.0), (1, 0.5), (1, 0.9), (1, 1.0), (3, 0.5), (20, 0.5)]:
        x = _input(m, k, sparsity, g)
        want, scale = _reference(x, q, s, b, bits, group, o=o)
        for sparse in (True, False):
            torch.testing.assert_close(_run(x, q, s, b, bits, group, sparse, tiles=tiles, splits=splits, o=o) / scale,
                                       want / scale, **TOL)
        want, scale = _reference(x, q, s, b, bits, group, thr=0.5, o=o)
        torch.testing.assert_close(_run(x, q, s, b, bits, group, True, thr=0.5, tiles=tiles, splits=splits, o=o)
                                   / scale, want / scale, **TOL)


@pytest.mark.parametrize("bits,rows", [(4, 16), (8, 32), (4, 4), (8, 1)])
def test_every_survivor_count_of_a_group(bits, rows):
    """Group g of 32 keeps exactly g inputs (0..31), so every tail of a group-wise pass (count % R rows in one pass,
    as chunks of R/2, ..., 1 rows; none with R = 1) runs once, and the output equals the reference; R must be a
    power of two up to 32."""
    k, n, group = 32 * 32, 64, 32
    g = torch.Generator().manual_seed(11)
    q, s, b, _ = _weights(k, n, bits, group, g)
    x = torch.randn(1, k, generator=g)
    for grp in range(32):
        x[0, grp * group + grp:(grp + 1) * group] = 0
    want, scale = _reference(x, q, s, b, bits, group)
    f = quantized_linear_kernel(k, n, bits, group, rows_per_pass=rows, splits=2)
    kernel = tvm.compile(f.with_attr("global_symbol", "main"), cpu_target())["main"]
    wq, sp = pack_quantized(q, s, bits)
    y = torch.full((1, n), float("nan"))
    kernel(x, wq, sp, torch.zeros(1), b, y)
    torch.testing.assert_close(y / scale, want / scale, **TOL)
    with pytest.raises(ValueError, match="^rows_per_pass 12 of a group-wise kernel is not a power of two up to 32$"):
        quantized_linear_kernel(k, n, bits, group, rows_per_pass=12)


@pytest.mark.parametrize("bits", [8, 4])
def test_sparse_kernel_skips_groups_of_zero_inputs(bits):
    """The scales of a group whose inputs are all zero (or under the threshold) are NaN: the sparse kernel's output
    stays finite and exact (it reads neither that group's weights nor its scales), the dense kernel's is NaN.
    (Integer weights cannot be NaN, so skipped rows of a per-channel layer cannot be told apart by their output.)"""
    k, n, group = 128, 96, 32
    g = torch.Generator().manual_seed(7)
    q, s, b, _ = _weights(k, n, bits, group, g)
    x = _input(1, k, 0.0, g)
    x[0, 32:64] = 0
    x[0, 96:128] = 0.25
    want, scale = _reference(x, q, s, b, bits, group, thr=0.5)
    s = s.clone()
    s[:, 1] = s[:, 3] = float("nan")
    torch.testing.assert_close(_run(x, q, s, b, bits, group, True, thr=0.5) / scale, want / scale, **TOL)
    assert _run(x, q, s, b, bits, group, False).isnan().all()


def test_layout_and_tiles():
    """int8 tiles of 16 columns, int4 of 32 (16 bytes a row), one tile up to MAX_TILE columns (its kept rows split
    between the threads), else a multiple of the threads; the int4 packing puts column i in the low nibble of byte i
    and column 16 + i in the high one, as value + 8."""
    assert tile_width(300, 2, 8) == 160 and tile_width(300, 2, 4) == 160 and tile_width(100, 3, 4) == 64
    assert num_tiles(11008, 4, threads=2) == 1 and num_splits(1, threads=2) == 2
    assert num_tiles(262144, 8, threads=2) == 16 and tile_width(262144, 16, 8) <= MAX_TILE
    assert num_splits(16, threads=2) == 1 and num_tiles(262144, 8, threads=3) == 18
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32).repeat(32, 1)  # [N=32, K=32]
    from sparsec.ops import pack_int4
    wq, s = pack_quantized(pack_int4(q), torch.ones(32, 1), 4, tiles=1)
    assert wq.shape == (1, 32, 16) and wq.dtype == torch.uint8 and s.shape == (1, 1, 32)
    # row k of the packed tile holds column c = 0..31 of W[:, k] = q[c, k] = k - 8 (mod 16) for every c
    assert wq[0, 3, 0].item() == (3 - 8 + 8) | ((3 - 8 + 8) << 4)
    w8, _ = pack_quantized(q, torch.ones(32, 1), 8, tiles=2)
    assert w8.shape == (2, 32, 16) and torch.equal(w8[1, :, 0], q[16])
