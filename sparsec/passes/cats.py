"""cats: a calibrated magnitude threshold on the MLP activation output (CATS, arXiv 2404.08763; METHODS.md §3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec import progress
from sparsec.calibration import ThresholdSites
from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import TRANSPARENT_OPS, TargetMatcher, feeds_linear, module_path, produced_by_linear
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.relufy import find_activations
from sparsec.registry import register_pass

aten = torch.ops.aten
_SPARSITY_DEFINITION = "zeros in the MLP activation output (CATS), calibration data"


@dataclass(frozen=True)
class CatsConfig(PassConfig):
    """Zero the small-magnitude outputs of the MLP activation: CATS(x) = act(x) * (|act(x)| > t).

    Default (CATS): the gate activation of every gated MLP, down(CATS(gate(x)) * up(x)); the zeroed neurons let a
    sparse kernel skip rows of W_up and columns of W_down. fatrelu=true: the ReLU of any MLP instead (gated or not),
    which turns it into a calibrated FATReLU, relu(x) * (relu(x) > t) (threshold shifting, no training). One threshold
    per MLP, the |act| quantile at the target sparsity, calibrated in graph order on the already sparsified model with
    the streaming histogram of sparsec.calibration, applied by the op sparsec::threshold (the same op as teal, so the
    ONNX and TVM backends lower it). A target below the ReLU's own sparsity gives t = 0 (nothing changes).
    sparsity=0 reproduces the model bit for bit.
    Reported sparsity: zeros in the activation output on the calibration data (CATS's definition).
    """

    sparsity: float = option(0.5, ge=0.0, lt=1.0, help="target fraction of zeros in each activation output")
    fatrelu: bool = option(False, help="threshold the ReLU activations of any MLP (calibrated FATReLU) instead of"
                           " the gate activations of gated MLPs")
    calib_rounds: int = option(1, ge=1, le=10, help="passes over the calibration data")
    calib_bits: int = option(8, ge=2, le=12, help="histogram resolution: 2^calib_bits bins per octave of |x|")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the activations to"
                                " threshold; empty = every candidate")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave alone (applied last)")


def _through_transparent_down(node: fx.Node) -> list[fx.Node]:
    """The users of ``node``, looking through layout ops."""
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target in TRANSPARENT_OPS:
            out.extend(_through_transparent_down(user))
        else:
            out.append(user)
    return out


def _gated(act) -> bool:
    """act(gate(x)) multiplied elementwise by another linear's output (up(x)), the product feeding a linear."""
    for user in _through_transparent_down(act.output):
        if user.op == "call_function" and user.target is aten.mul.Tensor:
            other = [a for a in user.args if isinstance(a, fx.Node) and a is not act.output]
            if other and produced_by_linear(other[0]) and feeds_linear(user):
                return True
    return False


def candidates(gm: fx.GraphModule, cfg: CatsConfig, matcher: TargetMatcher) -> list:
    out = []
    for act in find_activations(gm):
        if not produced_by_linear(act.input) or not feeds_linear(act.output):
            continue
        if cfg.fatrelu:
            if act.kind.lower() != "relu":
                continue
        elif not _gated(act):
            continue
        if matcher.selects(act.output):
            out.append(act)
    return out


@register_pass("cats", CatsConfig, needs_calibration=True, after=("relufy",))
def cats(gm: fx.GraphModule, cfg: CatsConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("cats", cfg.targets, cfg.ignore)
    acts = candidates(gm, cfg, matcher)
    matcher.check_all_used()
    if not acts:
        what = "ReLU activation of an MLP (fatrelu=true)" if cfg.fatrelu else "gated MLP (act(gate(x)) * up(x))"
        fix = "relufy the model first ('relufy,cats{fatrelu=true}')" if cfg.fatrelu else \
            "use cats{fatrelu=true} for ReLU MLPs, or teal"
        raise UsageError(f"cats: no {what} matched the targets; {fix}; 'sparsec trace MODEL' lists the activations")
    groups = [(act.output, [(user, module_path(act.output)) for user in list(act.output.users)]) for act in acts]
    sites = ThresholdSites(gm, groups, "sparsec_cats", cfg.calib_bits)
    try:
        if cfg.sparsity > 0:
            with progress.task("cats: calibrate"):
                sites.calibrate(ctx.forward_loop, [[cfg.sparsity] * len(s.thresholds) for s in sites.sites],
                                cfg.calib_rounds)
        else:
            for site in sites.sites:
                for t in site.thresholds:
                    t.fill_(0.0)
    finally:
        sites.remove_observers()
    entries, zeros, total = [], 0, 0
    for act, site in zip(acts, sites.sites):
        measured = site.zeros[0] / site.numel if site.numel else None
        zeros, total = zeros + site.zeros[0], total + site.numel
        entries.append({"module": module_path(act.output), "op": "cats" if not cfg.fatrelu else "fatrelu",
                        "activation": act.kind, "threshold": float(site.thresholds[0]),
                        "target_sparsity": cfg.sparsity,
                        "measured_sparsity": None if measured is None else round(measured, 6)})
    stats = {"thresholds": len(acts), "target_sparsity": cfg.sparsity,
             "measured_sparsity": round(zeros / total, 6) if total else None,
             "calibration_rounds": cfg.calib_rounds if cfg.sparsity > 0 else 0, "definition": _SPARSITY_DEFINITION}
    return PassResult(gm, stats, entries)
