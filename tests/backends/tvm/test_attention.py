"""sparsec's scheduled attention kernel (sparsec.backends.tvm.attention), built for this CPU, against torch's sdpa.

Cache lengths cross the online-softmax chunk (64) and are not multiples of it; masks: boolean (with a per-head
variant), additive float, is_causal, none; grouped-query heads; one query (a decode step) and several (a prefill).
"""
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")

from sparsec.backends.tvm.attention import CHUNK, attention_kernel, lanes  # noqa: E402
from sparsec.backends.tvm.env import cpu_target  # noqa: E402

TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "float16": dict(rtol=2e-3, atol=2e-3),
       "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}


def _run(heads, kv_heads, dim, batch, seq, length, mask=None, mask_heads=1, causal=False, dtype="float32",
         scale=None):
    f = attention_kernel(heads, kv_heads, dim, dim, dtype, scale=scale, mask=mask, mask_heads=mask_heads,
                         causal=causal).with_attr("global_symbol", "main")
    kernel = tvm.compile(f, cpu_target())["main"]
    g = torch.Generator().manual_seed(heads * 100 + length)
    td = getattr(torch, dtype)
    q = torch.randn(batch, heads, seq, dim, generator=g).to(td)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g).to(td) for _ in range(2))
    if mask == "bool":
        m = torch.rand(batch, mask_heads, seq, length, generator=g) > 0.3
        m[..., :1] = True
    elif mask == "float":
        m = torch.randn(batch, mask_heads, seq, length, generator=g).to(td)
    else:
        m = torch.zeros(1, dtype=torch.bool)
    out = torch.full((batch, heads, seq, dim), float("nan"), dtype=td)
    kernel(q, k, v, m, out)
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                          v.float().repeat_interleave(rep, 1), is_causal=causal, scale=scale,
                                          attn_mask=None if mask is None else m if mask == "bool" else m.float())
    torch.testing.assert_close(out.float(), want.to(td).float(), **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,dim,batch,seq,length,mask,mask_heads", [
    (4, 2, 16, 2, 1, 1, "bool", 1), (4, 2, 16, 2, 3, 70, "bool", 1), (8, 2, 64, 1, 1, 2 * CHUNK + 3, "bool", 1),
    (4, 4, 24, 1, 2, 9, "bool", 4), (8, 2, 64, 1, 1, 130, "float", 1), (4, 1, 16, 1, 5, 5, None, 1),
    (2, 2, 12, 1, 1, 33, "float", 2), (2, 1, 7, 1, 2, 9, "bool", 1)])
def test_matches_sdpa(heads, kv_heads, dim, batch, seq, length, mask, mask_heads):
    _run(heads, kv_heads, dim, batch, seq, length, mask, mask_heads)


def test_causal_and_scale():
    _run(4, 2, 16, 2, 5, 5, causal=True)
    _run(4, 2, 16, 1, 3, 3, causal=True, scale=0.3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    _run(4, 2, 64, 1, 3, 100, "bool", dtype=dtype)


def test_fully_masked_row_gives_zeros():
    f = attention_kernel(2, 1, 16, 16, mask="bool").with_attr("global_symbol", "main")
    kernel = tvm.compile(f, cpu_target())["main"]
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 7, 16), torch.randn(1, 1, 7, 16)
    out = torch.full((1, 2, 1, 16), float("nan"))
    kernel(q, k, v, torch.zeros(1, 1, 1, 7, dtype=torch.bool), out)
    assert torch.equal(out, torch.zeros_like(out))


def test_lanes():
    assert [lanes(n) for n in (64, 80, 24, 12, 7)] == [16, 16, 8, 4, 1]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_append(dtype):
    """cat(past, new, dim=2): lengths with and without a vector tail, an empty past."""
    from sparsec.backends.tvm.attention import cache_append_kernel

    td = getattr(torch, dtype)
    for heads, dim, batch, past, new in [(3, 7, 2, 5, 1), (4, 16, 1, 64, 3), (2, 16, 2, 0, 3), (1, 8, 1, 1, 1)]:
        kernel = tvm.compile(cache_append_kernel(heads, dim, dtype).with_attr("global_symbol", "main"),
                             cpu_target())["main"]
        a, b = torch.randn(batch, heads, past, dim).to(td), torch.randn(batch, heads, new, dim).to(td)
        out = tvm.runtime.empty((batch, heads, past + new, dim), dtype)
        kernel(*(tvm.runtime.tensor(x.numpy()) for x in (a, b)), out)  # torch's empty tensors have odd strides
        assert torch.equal(torch.from_numpy(out.numpy()), torch.cat([a, b], 2))


def test_capacity_variant_reads_only_the_first_positions():
    """The in-place cache's kernel: K/V buffers of capacity 80 (NaN past position t) attend over t positions."""
    f = attention_kernel(4, 2, 16, 16, mask="bool", capacity=True).with_attr("global_symbol", "main")
    kernel = tvm.compile(f, cpu_target())["main"]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 2, 16, generator=g)
    k, v = (torch.full((1, 2, 80, 16), float("nan")) for _ in range(2))
    for t in (1, 70):
        k[:, :, :t], v[:, :, :t] = torch.randn(1, 2, t, 16, generator=g), torch.randn(1, 2, t, 16, generator=g)
        m = torch.rand(1, 1, 2, t, generator=g) > 0.3
        m[..., :1] = True
        out = torch.empty(1, 4, 2, 16)
        kernel(q, k, v, m, t, out)
        want = F.scaled_dot_product_attention(q, k[:, :, :t].repeat_interleave(2, 1),
                                              v[:, :, :t].repeat_interleave(2, 1), attn_mask=m)
        torch.testing.assert_close(out, want, **TOL["float32"])


def test_cache_write_in_place():
    from sparsec.backends.tvm.attention import cache_write_kernel

    kernel = tvm.compile(cache_write_kernel(2, 16).with_attr("global_symbol", "main"), cpu_target())["main"]
    cache, new = torch.zeros(1, 2, 10, 16), torch.randn(1, 2, 3, 16)
    kernel(cache, new, 4)
    want = torch.zeros(1, 2, 10, 16)
    want[:, :, 4:7] = new
    assert torch.equal(cache, want)
    with pytest.raises(Exception, match="cache is full"):
        kernel(cache, new, 8)
