"""The CUDA sparse linear kernels (float and quantized) without a GPU: CPU emulation numerics, CUDA codegen, nvcc for
sm_90, and the errors that name what a CUDA build or run is missing."""
import ctypes.util

import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.cuda import (cuda_linear_kernel, cuda_quantized_kernel, cuda_sources,  # noqa: E402
                                       cuda_target, nvcc_compile, pack_quantized_cuda, pack_weight_cuda, require_gpu,
                                       require_nvcc)
from sparsec.backends.tvm.env import cpu_target  # noqa: E402
from sparsec.backends.tvm.kernels import reference  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402
from sparsec.ops import DEQUANTIZE  # noqa: E402
from sparsec.passes.quantize import quantize_weight  # noqa: E402

TOL = {"float32": dict(rtol=1e-5, atol=1e-4), "float16": dict(rtol=2e-3, atol=2e-2)}


@pytest.mark.parametrize("dtype,splits,unroll", [("float32", 16, 1), ("float16", 16, 1), ("float32", 64, 4)])
def test_cpu_emulation_matches_reference(dtype, splits, unroll):
    k, n = 300, 1000  # neither a multiple of the split-K nor of the column tile
    g = torch.Generator().manual_seed(0)
    td = getattr(torch, dtype)
    w, b = torch.randn(n, k, generator=g).to(td), torch.randn(n, generator=g).to(td)
    f = tvm.compile(cuda_linear_kernel(k, n, dtype, threshold=True, gpu=False, splits=splits, unroll=unroll)
                    .with_attr("global_symbol", "main"), cpu_target())["main"]
    wt = pack_weight_cuda(w, splits=splits, unroll=unroll)
    assert wt.shape == (304, 1024)  # K padded by less than one block: 16 x 19 rows, or 38 x 8
    for m, thr in [(1, 0.5), (3, 0.0), (1, 100.0)]:
        x = torch.randn(m, k, generator=g).to(td)
        y = torch.full((m, n), float("nan"), dtype=td)
        f(x, wt, torch.tensor([thr], dtype=td), b, y)
        want = torch.from_numpy(reference(x.float(), w.float(), thr, b.float())).to(td)
        torch.testing.assert_close(y.float(), want.float(), **TOL[dtype])
        if thr == 100.0:
            assert torch.equal(y, b.expand(m, n))  # every input dropped: the bias alone


@pytest.mark.parametrize("bits,group,scales,offsets,splits,unroll", [
    (8, 0, torch.float32, False, 16, 1), (8, 32, torch.float16, False, 16, 1), (4, 32, torch.float16, False, 16, 1),
    (4, 64, torch.float32, False, 16, 1), (4, 0, torch.float32, False, 16, 1),
    (8, 0, torch.float32, True, 16, 1), (8, 32, torch.float32, True, 16, 1), (4, 32, torch.float16, True, 16, 1),
    (4, 0, torch.float16, True, 16, 1), (4, 32, torch.float16, True, 64, 4), (8, 0, torch.float32, False, 64, 4)])
def test_quantized_cpu_emulation_matches_reference(bits, group, scales, offsets, splits, unroll):
    """Against ``linear(x', dequantize(q, s, offset=o))`` (``o`` with offsets: ``quantize{symmetric=false}``, else
    none): K = 640 is 20 groups of 32 in 10 blocks of 2 (20 blocks of 1 when 64 are asked for); per channel with 64
    blocks of rows unrolled 4 times, 54 blocks of 12 rows (8 padding rows); N = 1000 is not a multiple of a block's
    256 columns. A group whose inputs are all zero reads neither weights nor scale (nor offset): its scales (and
    offsets) are NaN in the kernel's copy, and the output is still the reference's."""
    k, n = 640, 1000
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    if offsets:
        w += 0.5  # off-centre weights: the offsets' term is large
    q, s, o = quantize_weight(w, bits, group, scales, symmetric=not offsets)
    assert (o is not None) == offsets
    wq, sp = pack_quantized_cuda(q, s, bits, group, offset=o, splits=splits, unroll=unroll)
    assert sp.shape[0] == (2 if offsets else 1) * (wq.shape[0] // group if group else 1)
    dropped, rows = [3, 7] if group else [], 2 if offsets else 1  # rows of S per group
    for i in dropped:
        sp[i * rows:(i + 1) * rows] = float("nan")
    f = tvm.compile(cuda_quantized_kernel(k, n, bits, group, threshold=True, scale_dtype=str(scales)[6:],
                                          offsets=offsets, gpu=False, splits=splits, unroll=unroll).with_attr(
                                              "global_symbol", "main"),
                    cpu_target())["main"]
    weight = DEQUANTIZE(q, s, bits, group, torch.float32, o)
    for m, thr in [(1, 0.5), (3, 0.0), (1, 100.0)]:
        x = torch.randn(m, k, generator=g)
        for i in dropped:
            x[:, i * group:(i + 1) * group] = 0
        y = torch.full((m, n), float("nan"))
        f(x, wq, sp, torch.tensor([thr]), b, y)
        want = torch.nn.functional.linear(x * (x.abs() > thr), weight, b)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        if thr == 100.0:
            assert torch.equal(y, b.expand(m, n))  # every input dropped: the bias alone


def test_cuda_source_compiles_with_nvcc_for_sm_90():
    try:
        require_nvcc()
    except SparsecError as exc:
        pytest.skip(str(exc))
    funcs = {f"linear_{dt}": cuda_linear_kernel(300, 1000, dt, threshold=True) for dt in ("float32", "float16")}
    funcs.update({f"int{bits}g{group}{'o' if offsets else ''}": cuda_quantized_kernel(
        640, 1000, bits, group, threshold=True, scale_dtype="float16", offsets=offsets)
        for bits, group, offsets in [(8, 0, False), (4, 32, False), (4, 32, True), (8, 0, True)]})
    funcs.update({"linear_float16_u8": cuda_linear_kernel(300, 1000, "float16", threshold=True, unroll=8),
                  "int8_u8": cuda_quantized_kernel(640, 1000, 8, 0, threshold=True, unroll=8),
                  "int4g32o_u8": cuda_quantized_kernel(640, 1000, 4, 32, threshold=True, offsets=True, unroll=8)})
    sources = cuda_sources(tvm.compile(tvm.IRModule({name: f.with_attr("global_symbol", name)
                                                     for name, f in funcs.items()}), cuda_target("sm_90")))
    assert len(sources) == 1
    src = sources[0]
    assert all("void __launch_bounds__" in src and f" {name}_kernel(" in src for name in funcs)
    assert "float4" in src and "uint4" in src  # 16-byte loads of the weights, fp32 and fp16
    assert "*(int*)(wq_ptr" in src and "*(uint*)(wq_ptr" in src  # int8 and int4 weights: 4-byte loads
    assert "half* __restrict__ s_ptr" in src  # fp16 scales
    cubin = nvcc_compile(src, "sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_missing_nvcc_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparsecError) as info:
        require_nvcc()
    assert str(info.value) == ("--target cuda needs the CUDA compiler nvcc, which is not on PATH: install the CUDA"
                               " toolkit (or add its bin/ directory to PATH), or use --target llvm")


def test_missing_driver_is_named():
    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("this machine has the NVIDIA driver")
    with pytest.raises(SparsecError, match=r"needs the NVIDIA driver \(libcuda.so.1 was not found\)"):
        require_gpu()
