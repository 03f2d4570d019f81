"""A scheduled CPU attention kernel for ``aten.scaled_dot_product_attention`` over a KV cache.

TVM's CPU pipeline does not schedule the ops it legalizes sdpa into: the scores ``[B, H, S, T]`` are a naive
single-threaded loop nest, the softmax another, and grouped-query attention materialises every key and value head
``H / Hk`` times first. :func:`attention_kernel` instead runs one task per (batch, KV head, query position), in
parallel, each for all ``G = H / Hk`` query heads of its KV head, so every cached key and value row is read once
per task. The cache is walked in chunks of ``CHUNK`` positions with an online softmax (running max and sum, fp32),
so no ``[S, T]`` buffer is ever made; dot products and value accumulation are vectorised over the head dimension.

Masks, as torch's sdpa takes them: a boolean mask (True = attend), a float mask (added to the scores), ``is_causal``
(top-left aligned, as torch), or none. A fully masked row gives zeros (torch's math kernel gives NaN there; the
programs sparsec captures never mask a whole row: a token always attends to itself).
"""
from __future__ import annotations

import math

CHUNK = 64  # cache positions per online-softmax step


def lanes(n: int, widest: int = 16) -> int:
    """The widest power of two, at most ``widest`` (fp32 lanes of one AVX-512 vector), that divides ``n``."""
    lane = widest
    while n % lane:
        lane //= 2
    return lane


def attention_kernel(heads: int, kv_heads: int, dim: int, value_dim: int, dtype: str = "float32", *,
                     scale: float | None = None, mask: str | None = None, mask_heads: int = 1,
                     causal: bool = False):
    """A PrimFunc ``(q [B, H, S, D], k [B, Hk, T, D], v [B, Hk, T, Dv], mask, out [B, H, S, Dv])``, ``B, S, T``
    symbolic: ``out = softmax(scale * q @ k.T + mask) @ v`` per head, query head ``h`` reading KV head
    ``h // (H / Hk)``.

    ``mask``: None (no mask argument is read: pass any tensor of shape [1]), ``'bool'`` (True = attend) or
    ``'float'`` (added to the scores), shaped ``[B, mask_heads, S, T]`` (``mask_heads`` 1 or H). ``causal``:
    position ``j`` is masked for query ``i`` when ``j > i`` (torch's ``is_causal``). ``scale`` defaults to
    ``1 / sqrt(D)``. Storage dtype float32, float16 or bfloat16 (the mask of a float mask too); accumulation fp32.
    """
    from tvm.script import tirx as T

    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    g_heads = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    lq, lv = lanes(dim), lanes(value_dim)
    f32 = "float32"
    mdtype = "bool" if mask in (None, "bool") else dtype
    neg_inf = T.float32(float("-inf"))

    def mask_shape(b, s, t):
        return (1,) if mask is None else (b, mask_heads, s, t)

    def masked(score, mk, bi, h, si, tj):  # the score of query si against position tj after the mask
        if causal:
            score = T.if_then_else(tj <= si, score, neg_inf)
        hm = h if mask_heads > 1 else 0
        if mask == "bool":
            return T.if_then_else(mk[bi, hm, si, tj], score, neg_inf)
        if mask == "float":
            return score + T.cast(mk[bi, hm, si, tj], f32)
        return score

    def halves(vec, n):  # an n-lane vector summed pairwise down to 2 lanes (log2(n) - 1 shuffles)
        while n > 2:
            n //= 2
            vec = T.vectorlow(f"float32x{n}", vec) + T.vectorhigh(f"float32x{n}", vec)
        return vec

    @T.prim_func(private=True)
    def f(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        b, s, t = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, heads, s, dim), dtype)
        k = T.match_buffer(k_h, (b, kv_heads, t, dim), dtype)
        v = T.match_buffer(v_h, (b, kv_heads, t, value_dim), dtype)
        mk = T.match_buffer(m_h, mask_shape(b, s, t), mdtype)
        out = T.match_buffer(o_h, (b, heads, s, value_dim), dtype)
        for task in T.parallel(b * kv_heads * s):
            bi = task // (kv_heads * s)
            hk = task // s % kv_heads
            si = task % s
            qs = T.decl_buffer((g_heads * dim,), f32)  # the G query rows, scaled
            sc = T.decl_buffer((g_heads * CHUNK,), f32)  # scores of one chunk, then its probabilities
            mx = T.decl_buffer((g_heads,), f32)  # running max
            den = T.decl_buffer((g_heads,), f32)  # running sum of exp
            acc = T.decl_buffer((g_heads * value_dim,), f32)
            red = T.decl_buffer((lq,), f32)
            for g in range(g_heads):
                mx[g] = T.min_value(f32)
                den[g] = T.float32(0)
                for d in range(dim):
                    qs[g * dim + d] = T.cast(q[bi, hk * g_heads + g, si, d], f32) * T.float32(scale)
                for d0 in range(value_dim // lv):
                    for vi in T.vectorized(lv):
                        acc[g * value_dim + d0 * lv + vi] = T.float32(0)
            for c in range((t + CHUNK - 1) // CHUNK):
                n = T.min(T.int64(CHUNK), t - c * CHUNK)
                for j in range(n):
                    for g in range(g_heads):
                        for vi in T.vectorized(lq):
                            red[vi] = T.float32(0)
                        for d0 in range(dim // lq):
                            for vi in T.vectorized(lq):
                                red[vi] = red[vi] + qs[g * dim + d0 * lq + vi] * T.cast(
                                    k[bi, hk, c * CHUNK + j, d0 * lq + vi], f32)
                        if lq > 1:
                            red[T.ramp(0, 1, 2)] = halves(red[T.ramp(0, 1, lq)], lq)
                            red[0] = red[0] + red[1]
                        sc[g * CHUNK + j] = masked(red[0], mk, bi, hk * g_heads + g, si, c * CHUNK + j)
                for g in range(g_heads):
                    top = T.decl_buffer((1,), f32)
                    top[0] = mx[g]
                    for j in range(n):
                        top[0] = T.max(top[0], sc[g * CHUNK + j])
                    alpha = T.exp(mx[g] - top[0])
                    mx[g] = top[0]
                    den[g] = den[g] * alpha
                    for d0 in range(value_dim // lv):
                        for vi in T.vectorized(lv):
                            acc[g * value_dim + d0 * lv + vi] = acc[g * value_dim + d0 * lv + vi] * alpha
                    for j in range(n):
                        sc[g * CHUNK + j] = T.exp(sc[g * CHUNK + j] - top[0])
                        den[g] = den[g] + sc[g * CHUNK + j]
                    for j in range(n):
                        for d0 in range(value_dim // lv):
                            for vi in T.vectorized(lv):
                                acc[g * value_dim + d0 * lv + vi] = acc[g * value_dim + d0 * lv + vi] + sc[
                                    g * CHUNK + j] * T.cast(v[bi, hk, c * CHUNK + j, d0 * lv + vi], f32)
            for g in range(g_heads):
                for d in range(value_dim):
                    out[bi, hk * g_heads + g, si, d] = T.cast(T.if_then_else(
                        den[g] > T.float32(0), acc[g * value_dim + d] / den[g], T.float32(0)), dtype)

    return f
