"""teal: training-free magnitude thresholding of linear-layer inputs (TEAL, arXiv 2408.14690; METHODS.md §2)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.calibration import ThresholdSites, progress
from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import TargetMatcher, WeightLayer, module_stack, weight_layers, weight_numel
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass

aten = torch.ops.aten

#: Matrix-multiply ops TEAL thresholds by default (convolutions only when targeted with scope=all).
_MATMUL_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a numbered child of a ModuleList: layers.3, h.0, layer.5, ...
#: What measured_sparsity counts (METHODS.md, "Sparsity definitions"); *_param_weighted is TEAL's own number.
_SPARSITY_DEFINITION = "zeros in thresholded linear inputs, calibration data"


@dataclass(frozen=True)
class TealConfig(PassConfig):
    """Zero the small-magnitude inputs of every linear layer in the transformer blocks: x * (|x| > t) (TEAL).

    One threshold t per weight layer, a buffer of the rewritten module, applied by the custom op sparsec::threshold
    (it saves, loads and re-exports). t is the |x| quantile at the layer's target sparsity, from a streaming histogram
    (bounded memory, relative error <= 2^-calib_bits; see sparsec.calibration). Calibration runs in graph order on the
    already sparsified model, in one pass over the data: each threshold is set, within the forward, from the
    histogram of its input before that input reaches its layer, so later layers are calibrated on the inputs they
    will see (TEAL calibrates on the dense model and misses the target downstream). Inputs shared by several layers
    (q/k/v, gate/up) are observed once. allocation=greedy runs TEAL's block-wise greedy search first (per-projection
    sparsities per block; the lookup table is stored in the report, stats.greedy_table). Default targets: the linears
    inside numbered blocks (Llama/Mistral/Qwen2/Gemma q,k,v,o,gate,up,down; GPT-2 c_attn, attn c_proj, c_fc, mlp
    c_proj; BERT query/key/value, attention output, intermediate, output), not the LM head or pooler.
    sparsity=0 sets every threshold to 0, which reproduces the model bit for bit.
    Reported sparsity: zeros in the inputs of the thresholded layers on the calibration data, counted with the
    thresholds in force (TEAL's definition, parameter-weighted, and element-weighted).
    """

    sparsity: float = option(0.5, ge=0.0, lt=1.0, help="target fraction of zeros: per thresholded input (uniform) or"
                             " parameter-weighted per block (greedy)")
    allocation: Literal["uniform", "greedy"] = option(
        "uniform", help="uniform: the same sparsity for every layer; greedy: TEAL's block-wise greedy search over"
        " per-projection sparsities (slower: about 7 block evaluations per step)")
    prefill: Literal["all", "half", "dense"] = option(
        "all", help="what is thresholded for inputs of more than one token: all = every token (only 'all' is"
        " implemented)")
    calib_rounds: int = option(1, ge=1, le=10, help="passes over the calibration data; each re-calibrates from the"
                               " thresholds the previous one ended with")
    calib_bits: int = option(8, ge=2, le=12, help="histogram resolution: 2^calib_bits bins per octave of |x|"
                             " (relative quantile error <= 2^-calib_bits)")
    greedy_step: float = option(0.05, gt=0.0, le=0.5, help="greedy: sparsity step of a projection as large as the"
                                " block's first one (step_p = greedy_step / w_p; TEAL: 0.05)")
    greedy_samples: int = option(2, ge=1, help="greedy: calibration sequences the search runs each block on")
    scope: Literal["blocks", "all"] = option("blocks", help="blocks: linears inside numbered blocks (not the LM"
                                             " head); all: every weight layer matched by targets")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the weight layers to"
                                " threshold; empty = every candidate in scope")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave dense (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.prefill != "all":
            raise UsageError(f"teal: prefill={self.prefill} is not implemented yet; only prefill=all (threshold"
                             " every token) is available")


def _candidates(gm: fx.GraphModule, cfg: TealConfig, matcher: TargetMatcher) -> list[WeightLayer]:
    out = []
    for layer in weight_layers(gm):
        if cfg.scope == "blocks" and (layer.node.target not in _MATMUL_OPS or not _IN_BLOCK.search(layer.module)):
            continue
        if matcher.selects(layer.node):
            out.append(layer)
    return out


@register_pass("teal", TealConfig, needs_calibration=True, after=("relufy",))
def teal(gm: fx.GraphModule, cfg: TealConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("teal", cfg.targets, cfg.ignore)
    layers = _candidates(gm, cfg, matcher)
    matcher.check_all_used()
    if not layers:
        where = "inside numbered transformer blocks (scope=blocks)" if cfg.scope == "blocks" else "in the model"
        raise UsageError(f"teal: no linear layer {where} matched the targets; list the model's layers with 'sparsec"
                         " trace MODEL' and give targets=… (module paths, 're:REGEX' or class names), or scope=all")
    groups: dict[fx.Node, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.input, []).append(layer)
    sites = ThresholdSites(gm, [(x, [(la.node, la.module) for la in g]) for x, g in groups.items()], "sparsec_teal",
                           cfg.calib_bits)
    site_of = {la.node: (site, j) for site, g in zip(sites.sites, groups.values()) for j, la in enumerate(g)}
    numel = {la.node: weight_numel(gm, la) for la in layers}
    target = {la.node: cfg.sparsity for la in layers}
    tables = []
    try:
        if cfg.allocation == "greedy" and cfg.sparsity > 0:
            tables = greedy_search(gm, sites, layers, site_of, numel, ctx, cfg)
            for table in tables:
                row = pick_row(table, cfg.sparsity)
                for module, p in zip(table["modules"], row[2]):
                    target[next(la.node for la in layers if la.module == module)] = p
        targets = [[target[c] for c in site.consumers] for site in sites.sites]
        if cfg.sparsity > 0:
            sites.calibrate(ctx.forward_loop, targets, cfg.calib_rounds)
        else:
            for site in sites.sites:
                for t in site.thresholds:
                    t.fill_(0.0)
    finally:
        sites.remove_observers()

    entries, zeros, total, wsum, wzero = [], 0, 0, 0.0, 0.0
    for la in layers:  # graph order
        site, j = site_of[la.node]
        measured = site.measured()[j] if cfg.sparsity > 0 else None
        entry = {"module": la.module, "op": "teal", "threshold": float(site.thresholds[j]),
                 "target_sparsity": round(target[la.node], 6), "measured_sparsity": None if measured is None
                 else round(measured, 6), "weight_numel": numel[la.node]}
        if measured is not None:
            zeros, total = zeros + site.zeros[j], total + site.numel
            wsum, wzero = wsum + numel[la.node], wzero + numel[la.node] * measured
        entries.append(entry)
    stats = {"thresholds": len(layers), "tensors_calibrated": len(sites.sites), "target_sparsity": cfg.sparsity,
             "allocation": cfg.allocation,
             "measured_sparsity": round(zeros / total, 6) if total else None,
             "measured_sparsity_param_weighted": round(wzero / wsum, 6) if wsum else None,
             "calibration_rounds": cfg.calib_rounds if cfg.sparsity > 0 else 0, "definition": _SPARSITY_DEFINITION}
    if tables:
        stats["greedy_table"] = tables
    return PassResult(gm, stats, entries)


# ------------------------------------------------------------------------------------------- greedy allocation


def block_of(module: str) -> str | None:
    """The numbered block a module path is inside ('model.layers.3' for 'model.layers.3.mlp.up_proj')."""
    m = _BLOCK.match(module)
    return m.group(1) if m else None


_BLOCK = re.compile(r"^(.*?\d+)(?:\.|$)")


def pick_row(table: dict, target: float) -> list:
    """The row ``[effective sparsity, error, per-projection sparsities]`` of a block's greedy table closest to
    ``target`` (TEAL's model-level lookup)."""
    return min(table["rows"], key=lambda row: abs(row[0] - target))


class _Enough(Exception):
    """Raised by the recorder once it holds the search samples, to end the forward_loop early."""


class _Recorder(nn.Module):
    """Identity that keeps the values of the block-input nodes for the first ``samples`` rows of data."""

    def __init__(self, samples: int):
        super().__init__()
        self.samples, self.rows, self.batches, self.current = samples, 0, [], None

    def forward(self, key, x):
        if key == 0:
            if self.rows >= self.samples:
                raise _Enough
            self.current = {}
            self.batches.append(self.current)
            self.rows += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
        self.current[key] = x
        return x


def _block_module(gm: fx.GraphModule, block: str) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The nodes of ``block`` as a GraphModule of its own: (module, the outside nodes its placeholders stand for)."""
    members = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")
               and any(path == block for path, _ in module_stack(n))]
    inside = set(members)
    graph, env, outside = fx.Graph(), {}, []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a not in env:
                if a.op == "get_attr":
                    env[a] = graph.get_attr(a.target)
                else:
                    outside.append(a)
                    env[a] = graph.placeholder(f"in{len(outside)}")
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    results = [n for n in members if any(u not in inside for u in n.users)]
    graph.output(tuple(env[n] for n in results))
    return fx.GraphModule(gm, graph), outside


def _block_error(out: tuple, ref: tuple) -> float:
    """TEAL's greedy error: L2 norm over hidden of the output difference on the last 25% of tokens, mean over batch
    and tokens (summed over the block's floating outputs of rank >= 2)."""
    err = 0.0
    for o, r in zip(out, ref):
        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() >= 2:
            d = (o - r).float()
            tokens = d.shape[-2]
            err += float(d[..., tokens - max(1, tokens // 4):, :].norm(dim=-1).mean())
    return err


def greedy_search(gm, sites, layers, site_of, numel, ctx, cfg) -> list[dict]:
    """TEAL's block-wise greedy allocation (METHODS.md §2) on the dense model's block inputs.

    Per block, weights w_p = parameter count of each projection relative to the block's first one, step_p =
    greedy_step / w_p; from all zeros, repeatedly raise the projection whose step adds the least block output error
    (:func:`_block_error`) until the effective sparsity sum(w_p s_p) / sum(w_p) reaches ``cfg.sparsity``. Thresholds
    for a candidate come from histograms of the dense inputs. Returns one table per block:
    ``{block, modules, weights, rows: [[effective sparsity, error, [s_p...]], ...]}``."""
    blocks: dict[str, list[WeightLayer]] = {}
    for la in layers:
        b = block_of(la.module)
        if b is not None:
            blocks.setdefault(b, []).append(la)
    if not blocks:
        return []
    subs = {b: _block_module(gm, b) for b in blocks}
    needed = list(dict.fromkeys(n for _, outside in subs.values() for n in outside))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed.sort(key=order.get)
    recorder = _Recorder(cfg.greedy_samples)
    gm.add_module("sparsec_teal_recorder", recorder)
    taps = []
    for k, n in enumerate(needed):
        with gm.graph.inserting_after(n):
            taps.append(gm.graph.call_module("sparsec_teal_recorder", (k, n)))
    gm.recompile()
    sites.set_mode("collect")  # dense histograms of every thresholded input, over the search samples
    try:
        with torch.no_grad():
            ctx.forward_loop(gm)
    except _Enough:
        pass
    finally:
        sites.set_mode("off")
        for tap in taps:
            gm.graph.erase_node(tap)
        gm.delete_submodule("sparsec_teal_recorder")
        gm.recompile()
    for site in sites.sites:
        site.hist.all_reduce()
    key = {n: k for k, n in enumerate(needed)}
    batches = recorder.batches
    tables = []
    for b, members in progress(blocks.items(), desc="teal greedy search", total=len(blocks)):
        sub, outside = subs[b]
        inputs = [[batch[key[n]] for n in outside] for batch in batches]
        bufs = [site_of[la.node][0].thresholds[site_of[la.node][1]] for la in members]
        hists = [site_of[la.node][0].hist for la in members]
        w = [numel[la.node] / max(numel[members[0].node], 1) for la in members]
        steps = [cfg.greedy_step / max(x, 1e-12) for x in w]

        def run() -> list[tuple]:
            with torch.no_grad():
                return [sub(*xs) for xs in inputs]

        for t in bufs:
            t.fill_(-1.0)
        ref = run()

        def error() -> float:
            errs = torch.tensor([sum(_block_error(o, r) for o, r in zip(run(), ref)) / len(ref)],
                                dtype=torch.float64)
            _all_reduce_mean(errs)
            return float(errs[0])

        s = [0.0] * len(members)
        eff = 0.0
        rows = [[0.0, 0.0, list(s)]]
        while eff < cfg.sparsity:
            best = None
            for p in range(len(members)):
                nxt = s[p] + steps[p]
                if nxt >= 0.99:
                    continue
                bufs[p].fill_(hists[p].quantile(nxt))
                e = error()
                bufs[p].fill_(hists[p].quantile(s[p]) if s[p] > 0 else -1.0)
                if best is None or e < best[1]:
                    best = (p, e)
            if best is None:
                break
            p, e = best
            s[p] += steps[p]
            bufs[p].fill_(hists[p].quantile(s[p]))
            eff = sum(wi * si for wi, si in zip(w, s)) / sum(w)
            rows.append([round(eff, 6), round(e, 6), [round(x, 6) for x in s]])
        for t in bufs:
            t.fill_(-1.0)
        tables.append({"block": b, "modules": [la.module for la in members], "weights": [round(x, 6) for x in w],
                       "rows": rows})
    return tables


def _all_reduce_mean(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
