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

Running torch with given decisions and the tie distance (``TIE``) are the product's :mod:`sparsec.backends.ties`, which
``sparsec export --verify`` uses the same way.
"""
import itertools

import numpy as np
import torch

from sparsec.backends.ties import TIE, compare_decisions, run_with_decisions, threshold_nodes

TOL = dict(rtol=1e-4, atol=1e-4)
#: the real Gemma 3 after relufy (not fine-tuned): logits up to |36|, and a backend sums in another order than torch
#: through 18 blocks: measured max |diff| 1.7e-4 (ORT's MLAS, 9-token text) and 2.0e-4 / 5.2e-4 (TVM, 9 / 16 tokens)
#: at real-text positions, about 1e-5 of the logit range: atol 1e-3
GEMMA_RELUFY_TOL = dict(rtol=1e-4, atol=1e-3)


def reference(program, inputs: dict, flips=(), rel: float = TIE):
    """(outputs, ties): the torch program on ``inputs``; ``ties`` counts the thresholded elements within ``rel``
    (relative) of their threshold, and the decision of the i-th tie met (in graph order) is flipped when ``flips[i]``."""
    ties = [0]

    def decide(node, x, t, own, passed):
        keep = own.flatten().clone()
        near = (x.abs() - t).abs() <= rel * t.abs()
        if passed is not None:  # a token threshold_prefill passes has no decision to flip
            near &= ~passed
        for i in near.flatten().nonzero().flatten().tolist():
            keep[i] ^= ties[0] < len(flips) and flips[ties[0]]
            ties[0] += 1
        return keep.view_as(x)

    return run_with_decisions(program, inputs, decide), ties[0]


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
    """``got`` (numpy outputs) and ``decisions`` (``{threshold node name: the backend's keep mask}``, one per threshold
    of ``program``) come from one backend run on ``inputs``. Asserts that (i) the torch program run with those
    decisions decides differently from them only at ties (:func:`sparsec.backends.ties.compare_decisions`) and
    (ii) then matches ``got`` within ``tol`` (compared as in :func:`assert_matches_up_to_ties`). Returns
    ``{threshold node name: (decisions differing, largest relative distance of them)}`` where any differ."""
    missing = [n.name for n in threshold_nodes(program) if n.name not in decisions]
    assert not missing, f"no backend decisions for thresholds {missing}"
    want, differ = compare_decisions(program, inputs, decisions)
    far = [f"{n}: {d['count']} decisions, up to {d['distance']:.3g} from t={d['t']:.4g}" for n, d in differ.items()
           if d["distance"] > rel]
    assert not far, f"the backend decides beyond ties (relative distance > {rel:g}): {'; '.join(far)}"
    differ = {n: (d["count"], d["distance"]) for n, d in differ.items()}
    for g, w in _pairs(got, want, inputs):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"with the backend's decisions ({differ}): {m}")
    return differ
