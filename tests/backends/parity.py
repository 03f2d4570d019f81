"""Backend parity with the torch artifact up to threshold ties (shared by the ONNX Runtime and TVM tests).

A TEAL threshold is a discontinuity: an activation whose magnitude lies within a few ulps of its threshold is kept by
one implementation and dropped by the other when the ops before it (an RMSNorm's mean, say) round differently. A
backend's ops and torch's kernels differ by ~1e-6 relative, so on real inputs such a tie appears now and then (the
real Gemma 3 after teal 0.5, on its BOS-led sample sentence cut to 9 tokens: one element of layer 4's q/k/v input at
token 2, 1.03e-6 relative from t=0.577), and the flipped element propagates to every later token and layer (max
|diff| 6.2 in the logits). Torch with that one decision flipped matches the backend within 1e-4. Two rules:

- :func:`assert_matches_up_to_ties` (a backend whose intermediate values cannot be read, TVM): the backend matches
  the torch program with some choice of decisions at its first few ties; with no tie in an input that is plain parity.
- :func:`assert_matches_with_decisions` (a backend that can output its threshold masks, ONNX Runtime): the torch
  program run with the backend's own decisions at every threshold differs from torch's decisions only at ties, and
  then matches the backend. Decisive however many ties there are (a tie flipped early moves later activations, so
  later ties are not torch's own): ORT on the real Gemma 3 after teal 0.5 flips two, in layers 3 and 10, that no
  choice at torch's first 4 ties reproduced.
"""
import itertools

import numpy as np
import torch

from sparsec.ops import THRESHOLD

TOL = dict(rtol=1e-4, atol=1e-4)
TIE = 3e-6  # relative distance |(|x| - t)| / t below which a backend and torch may decide a threshold differently


def _run(program, inputs: dict, decide) -> list:
    """The torch program on ``inputs`` with ``decide(node name, x, t) -> keep`` (bool, x's shape) at every
    ``sparsec::threshold`` (``x * keep``: what the op computes when keep is ``|x| > t``)."""

    class Decide(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op != "call_function" or n.target is not THRESHOLD:
                return super().run_node(n)
            x, t = self.fetch_args_kwargs_from_env(n)[0]
            return x * decide(n.name, x, t)

    with torch.no_grad():
        return list(Decide(program.module()).run(*inputs.values()))


def reference(program, inputs: dict, flips=(), rel: float = TIE):
    """(outputs, ties): the torch program on ``inputs``; ``ties`` counts the thresholded elements within ``rel``
    (relative) of their threshold, and the decision of the i-th tie met (in graph order) is flipped when ``flips[i]``."""
    ties = [0]

    def decide(name, x, t):
        keep = (x.abs() > t).flatten()
        for i in ((x.abs() - t).abs() <= rel * t.abs()).flatten().nonzero().flatten().tolist():
            keep[i] ^= ties[0] < len(flips) and flips[ties[0]]
            ties[0] += 1
        return keep.view_as(x)

    return _run(program, inputs, decide), ties[0]


def _pairs(got: list, want: list, inputs: dict) -> list:
    """(got, want) tensor pairs; outputs that start with the [batch, seq] dims of an ``attention_mask`` input only
    where it is 1 (a left-padded query's output is undefined)."""
    mask = inputs.get("attention_mask")
    return [(g[mask.bool()], w[mask.bool()]) if mask is not None and g.shape[:2] == mask.shape else (g, w)
            for g, w in zip((torch.from_numpy(np.asarray(g)) for g in got), want)]


def assert_matches_up_to_ties(got: list, program, inputs: dict, max_ties: int = 4, tol: dict = TOL):
    """``got`` (numpy outputs) matches the torch program on ``inputs`` with some choice of decisions at its first
    ``max_ties`` ties (none flipped first: with no tie this is plain parity). Outputs that start with the
    [batch, seq] dims of an ``attention_mask`` input are compared only where it is 1 (a left-padded query's output
    is undefined)."""
    want, ties = reference(program, inputs)
    for flips in itertools.product((False, True), repeat=min(ties, max_ties)):
        if flips and any(flips):
            want, _ = reference(program, inputs, flips)
        if all(torch.allclose(g, w, **tol) for g, w in _pairs(got, want, inputs)):
            return
    want, _ = reference(program, inputs)
    for g, w in _pairs(got, want, inputs):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{ties} ties: {m}")


def assert_matches_with_decisions(got: list, decisions: dict, program, inputs: dict, tol: dict = TOL,
                                  rel: float = TIE) -> dict:
    """``got`` (numpy outputs) and ``decisions`` (``{threshold node name: the backend's |x| > t}``, one per
    ``sparsec::threshold`` of ``program``) come from one backend run on ``inputs``. Asserts that (i) the torch program
    run with those decisions decides differently from them only at ties (``|(|x| - t)| <= rel * t`` for torch's x
    there, padded positions of an ``attention_mask`` left out) and (ii) then matches ``got`` within ``tol`` (compared
    as in :func:`assert_matches_up_to_ties`). Returns ``{threshold node name: (decisions differing, largest relative
    distance of them)}`` for the thresholds where any differ."""
    mask = inputs.get("attention_mask")
    missing = [n.name for n in program.graph.nodes if n.op == "call_function" and n.target is THRESHOLD
               and n.name not in decisions]
    assert not missing, f"no backend decisions for thresholds {missing}"
    differ, far = {}, []

    def decide(name, x, t):
        keep = torch.from_numpy(np.asarray(decisions[name]))
        assert keep.shape == x.shape, f"{name}: backend decisions of shape {tuple(keep.shape)}, x {tuple(x.shape)}"
        flipped = keep != (x.abs() > t)
        if mask is not None and x.shape[:2] == mask.shape:
            flipped &= mask.bool().view(*mask.shape, *[1] * (x.dim() - 2))
        if flipped.any():
            distance = ((x.abs() - t).abs() / t.abs())[flipped]
            differ[name] = (int(flipped.sum()), float(distance.max()))
            if differ[name][1] > rel:
                far.append(f"{name}: {differ[name][0]} decisions, up to {differ[name][1]:.3g} from t={float(t):.4g}")
        return keep

    want = _run(program, inputs, decide)
    assert not far, f"the backend decides beyond ties (relative distance > {rel:g}): {'; '.join(far)}"
    for g, w in _pairs(got, want, inputs):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"with the backend's decisions ({differ}): {m}")
    return differ
