"""regularize: L1 / Transformed-L1 penalties on activations or weights for sparsity training (METHODS.md §4)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import LINEAR_OPS, TargetMatcher, module_path, weight_layers, weight_operand
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.relufy import find_activations
from sparsec.registry import register_pass
from sparsec.training import REGULARIZE

HOLDER = "sparsec_regularize"


@dataclass(frozen=True)
class RegularizeConfig(PassConfig):
    """Add L1 or Transformed-L1 penalties on activations (ProSparse, DSTF) or weights, for sparsity training.

    Inserts taps (sparsec::regularize, an identity) on the penalised tensors; in training,
    sparsec.regularization_loss(model, step=step) returns Σ_taps λ(step) · penalty(tensor of the last forward),
    penalty = Σ|x| (l1) or Σ (a+1)|x| / (a+|x|) (tl1, DSTF's Transformed L1: a → 0 counts non-zeros, a → ∞ is
    L1), divided by the element count when normalize=true. λ(step) = weight × schedule: constant 1; linear
    min(step / warmup_steps, 1); progressive = ProSparse's sine stages from peaks[i-1] to peaks[i] ending at
    ends[i] (peaks[0] up to ends[0], peaks[-1] after the last end). Run 'strip' before export to remove the taps.
    Reports no sparsity of its own (nothing changes until training); the transform's measured effect is the MLP
    intermediate sparsity (ProSparse's definition).
    """

    kind: Literal["l1", "tl1"] = option("l1", help="l1: Σ|x|; tl1: Transformed L1 Σ (a+1)|x| / (a+|x|) (DSTF)")
    a: float = option(1.0, gt=0.0, help="the a of Transformed L1 (kind=tl1; DSTF's value is unverified)")
    weight: float = option(1e-3, ge=0.0, help="λ, the multiplier of the penalty (of the schedule for progressive)")
    normalize: bool = option(True, help="divide each tensor's penalty by its element count (mean instead of sum)")
    target: Literal["activations", "weights"] = option(
        "activations", help="activations: penalise activation maps (ProSparse, DSTF step 3); weights: penalise"
        " the weights of the layers (DSTF step 2, before threshold pruning)")
    scope: Literal["mlp", "all"] = option(
        "mlp", help="activations: mlp = the MLP intermediate (input of each down projection, act(gate(x))*up(x) or"
        " act(fc1(x))), all = the output of every activation function (DSTF's ReLU maps); weights: mlp = the"
        " layers producing and reading the MLP intermediate, all = every weight layer")
    schedule: Literal["constant", "linear", "progressive"] = option(
        "constant", help="how λ varies with the optimiser step (see the pass description)")
    warmup_steps: int = option(0, ge=0, help="schedule=linear: steps over which λ rises from 0 to weight")
    peaks: list[str] = option([], help="schedule=progressive: λ factors at the end of each stage, e.g."
                              " {5e-3,5e-2,5e-2,2e-1,2e-1} with weight=1 (ProSparse 7B)")
    ends: list[str] = option([], help="schedule=progressive: the step at which each stage ends, strictly"
                             " increasing, e.g. {1000,5000,7000,11000,11500}")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names to penalise; empty = every"
                                " candidate in scope")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave alone (applied last)")

    def __post_init__(self):
        for name in ("peaks", "ends"):  # YAML gives numbers; the option holds their text
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, [str(v) if isinstance(v, (int, float)) else v for v in value])
        super().__post_init__()
        peaks, ends = _numbers(self.peaks, float, "peaks"), _numbers(self.ends, int, "ends")
        if self.schedule != "progressive" and (peaks or ends):
            raise UsageError(f"regularize: peaks and ends apply to schedule=progressive only (schedule is"
                             f" {self.schedule}); remove them or set schedule=progressive")
        if self.schedule == "linear" and self.warmup_steps == 0:
            raise UsageError("regularize: schedule=linear needs warmup_steps > 0 (the steps over which λ rises)")
        if self.schedule == "progressive":
            if not peaks or len(peaks) != len(ends):
                raise UsageError(f"regularize: schedule=progressive needs peaks and ends of equal, non-zero length"
                                 f" (got {len(peaks)} peaks and {len(ends)} ends), e.g. peaks={{0.1,1}}"
                                 " ends={100,200}")
            if any(b <= e for e, b in zip(ends, ends[1:])) or ends[0] < 0:
                raise UsageError(f"regularize: ends must be non-negative and strictly increasing (got"
                                 f" {{{','.join(map(str, ends))}}})")
            if any(p < 0 for p in peaks):
                raise UsageError(f"regularize: peaks must be >= 0 (got {{{','.join(map(str, peaks))}}})")
        object.__setattr__(self, "peaks", [repr(p) for p in peaks])
        object.__setattr__(self, "ends", [str(e) for e in ends])


def _numbers(items: list[str], kind: type, name: str) -> list:
    try:
        values = [kind(s) for s in items]
    except ValueError:
        raise UsageError(f"bad value {items!r} for option '{name}' of pass 'regularize': expected a list of"
                         f" {'integers' if kind is int else 'numbers'}, e.g. {{1,2}}") from None
    if kind is float and any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise UsageError(f"bad value {items!r} for option '{name}' of pass 'regularize': expected finite numbers")
    return values


def mlp_producers(node: fx.Node, max_nodes: int = 64) -> set[fx.Node]:
    """The linear-like ops whose output reaches ``node`` through elementwise ops (gate/up of a gated MLP, fc1)."""
    found, seen, frontier = set(), set(), [node]
    while frontier and len(seen) < max_nodes:
        n = frontier.pop()
        if n in seen or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in LINEAR_OPS:
            found.add(n)
        else:
            frontier.extend(n.all_input_nodes)
    return found


def _sites(gm: fx.GraphModule, cfg: RegularizeConfig, matcher: TargetMatcher) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(tensor to penalise, the nodes whose use of it goes through the tap), in graph order."""
    layers = weight_layers(gm)
    if cfg.target == "activations" and cfg.scope == "all":
        return [(a.output, list(a.output.users)) for a in find_activations(gm) if matcher.selects(a.output)]
    if cfg.target == "activations":
        groups: dict[fx.Node, list[fx.Node]] = {}
        for layer in layers:
            if layer.mlp_intermediate and matcher.selects(layer.node):
                groups.setdefault(layer.input, []).append(layer.node)
        return list(groups.items())
    selected = layers
    if cfg.scope == "mlp":
        mlp = {n for layer in layers if layer.mlp_intermediate for n in mlp_producers(layer.input)}
        selected = [layer for layer in layers if layer.mlp_intermediate or layer.node in mlp]
    groups = {}
    for layer in selected:
        if matcher.selects(layer.node):
            groups.setdefault(weight_operand(layer.node), []).append(layer.node)
    return list(groups.items())


def _holder_name(gm: fx.GraphModule) -> str:
    name, i = HOLDER, 1
    while hasattr(gm, name):
        name, i = f"{HOLDER}_{i}", i + 1
    return name


@register_pass("regularize", RegularizeConfig, after=("relufy", "jsrelu", "db-mlp"))
def regularize(gm: fx.GraphModule, cfg: RegularizeConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("regularize", cfg.targets, cfg.ignore)
    sites = _sites(gm, cfg, matcher)
    matcher.check_all_used()
    if not sites:
        what = {("activations", "mlp"): "MLP intermediate (an input of a weight layer computed elementwise from"
                " another weight layer's output)", ("activations", "all"): "activation function",
                ("weights", "mlp"): "MLP weight layer", ("weights", "all"): "weight layer"}[(cfg.target, cfg.scope)]
        raise UsageError(f"regularize: the model has no {what} to penalise; see 'sparsec trace MODEL', or use"
                         " scope=all or target=weights")
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    name = _holder_name(gm)
    holder = nn.Module()
    gm.add_module(name, holder)
    options = (cfg.kind, cfg.a, cfg.normalize, cfg.schedule, cfg.weight, cfg.warmup_steps,
               [float(p) for p in cfg.peaks], [int(e) for e in cfg.ends])
    entries = []
    for k, (x, users) in enumerate(sites):
        holder.register_buffer(f"tap{k}", torch.zeros((), device=device))
        with gm.graph.inserting_after(x):
            slot = gm.graph.get_attr(f"{name}.tap{k}")
        with gm.graph.inserting_after(slot):
            tap = gm.graph.call_function(REGULARIZE, (x, slot, *options))
        tap.meta.update({key: x.meta[key] for key in ("val", "nn_module_stack", "stack_trace") if key in x.meta})
        slot.meta["nn_module_stack"] = x.meta.get("nn_module_stack")
        for user in users:
            user.replace_input_with(x, tap)
        path = (re.sub(r"\.weight$", "", str(x.target)) if x.op == "get_attr" else module_path(users[0])
                if cfg.target == "weights" else module_path(x))
        entries.append({"module": path, "op": "regularize", "tap": f"{name}.tap{k}"})
    gm.graph.lint()
    gm.recompile()
    stats = {"taps": len(sites), "target": cfg.target, "kind": cfg.kind,
             "definition": "penalty per tap: " + ("Σ|x|" if cfg.kind == "l1" else f"Σ(a+1)|x|/(a+|x|), a={cfg.a}")
             + (" / numel" if cfg.normalize else "")}
    return PassResult(gm, stats, entries)
