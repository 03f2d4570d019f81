"""The CUDA sparse linear kernel without a GPU: CPU emulation numerics, CUDA codegen, nvcc for sm_90, and the
errors that name what a CUDA build or run is missing."""
import ctypes.util

import pytest
import torch

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.cuda import (cuda_linear_kernel, cuda_sources, cuda_target, nvcc_compile,  # noqa: E402
                                       pack_weight_cuda, require_gpu, require_nvcc)
from sparsec.backends.tvm.env import cpu_target  # noqa: E402
from sparsec.backends.tvm.kernels import reference  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402

TOL = {"float32": dict(rtol=1e-5, atol=1e-4), "float16": dict(rtol=2e-3, atol=2e-2)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_emulation_matches_reference(dtype):
    k, n = 300, 1000  # neither a multiple of the split-K nor of the column tile
    g = torch.Generator().manual_seed(0)
    td = getattr(torch, dtype)
    w, b = torch.randn(n, k, generator=g).to(td), torch.randn(n, generator=g).to(td)
    f = tvm.compile(cuda_linear_kernel(k, n, dtype, threshold=True, gpu=False).with_attr("global_symbol", "main"),
                    cpu_target())["main"]
    for m, thr in [(1, 0.5), (3, 0.0), (1, 100.0)]:
        x = torch.randn(m, k, generator=g).to(td)
        y = torch.full((m, n), float("nan"), dtype=td)
        f(x, pack_weight_cuda(w), torch.tensor([thr], dtype=td), b, y)
        want = torch.from_numpy(reference(x.float(), w.float(), thr, b.float())).to(td)
        torch.testing.assert_close(y.float(), want.float(), **TOL[dtype])
        if thr == 100.0:
            assert torch.equal(y, b.expand(m, n))  # every input dropped: the bias alone


def test_cuda_source_compiles_with_nvcc_for_sm_90():
    try:
        require_nvcc()
    except SparsecError as exc:
        pytest.skip(str(exc))
    mod = tvm.IRModule({f"linear_{dt}": cuda_linear_kernel(300, 1000, dt, threshold=True).with_attr(
        "global_symbol", f"linear_{dt}") for dt in ("float32", "float16")})
    sources = cuda_sources(tvm.compile(mod, cuda_target("sm_90")))
    assert len(sources) == 1
    src = sources[0]
    assert "__global__" in src and "linear_float32" in src and "linear_float16" in src
    assert "float4" in src and "uint4" in src  # 16-byte loads of the weights, fp32 and fp16
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
