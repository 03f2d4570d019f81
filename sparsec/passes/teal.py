"""teal: training-free magnitude thresholding of linear-layer inputs (TEAL, arXiv 2408.14690; METHODS.md §2)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec import progress
from sparsec.calibration import ThresholdSites, all_reduce_sum
from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import (TargetMatcher, WeightLayer, is_rotation, linear_source, module_stack, output_pieces,
                           weight_layers, weight_numel)
from sparsec.passes.base import PassContext, PassResult
from sparsec.registry import register_pass

aten = torch.ops.aten

#: Matrix-multiply ops TEAL thresholds by default (convolutions only when targeted with scope=all).
_MATMUL_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_IN_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a numbered child of a ModuleList: layers.3, h.0, layer.5, ...
#: What measured_sparsity counts (METHODS.md, "Sparsity definitions"); *_param_weighted is TEAL's own number.
_SPARSITY_DEFINITION = "zeros in thresholded linear inputs, calibration data"
_PREFILL_DEFINITION = ("zeros in thresholded linear inputs, calibration data with every token thresholded (after"
                       " calibration prefill={} leaves some tokens dense)")
_FLATTEN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


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
    sparsities per block; the lookup table is stored in the report, stats.greedy_table), scoring a step by the block
    output error (greedy_error). Default targets: the linears inside numbered blocks (Llama/Mistral/Qwen2/Gemma
    q,k,v,o,gate,up,down; GPT-2 c_attn, attn c_proj, c_fc, mlp c_proj; BERT query/key/value, attention output,
    intermediate, output), not the LM head or pooler. A fused projection (Phi-3 qkv_proj / gate_up_proj, GPT-2 c_attn,
    GPT-NeoX query_key_value) is one layer with one threshold on its input; its report entry keeps the module path and
    adds ``fused``, the projections it computes in output order: q,k,v for three pieces; gate,up for two, the gate
    being the piece an activation reads; piece0,piece1,... otherwise.
    sparsity=0 sets every threshold to 0, which reproduces the model bit for bit (every prefill mode).
    prefill (METHODS.md §2) says which tokens of an input with S tokens (its second-to-last axis, [batch, S, hidden])
    are thresholded: all (every token); half (positions >= S // 2, TEAL's quality path; a one-token decode step is
    thresholded); dense (only S = 1 inputs, TEAL's speed path: dense prefill, sparse decode). Calibration (and the
    greedy search) is the same for every mode, with every calibration token thresholded, so the thresholds equal
    prefill=all's; then half/dense turn each threshold into the op sparsec::threshold_prefill (see sparsec.ops: the
    rule reads the symbolic S, so it holds at every length of the exported program). GPT-2's Conv1D flattens
    [batch, S, K] to [batch * S, K]: there the threshold goes before the flattening.
    Reported sparsity: zeros in the inputs of the thresholded layers on the calibration data, counted with the
    thresholds in force (TEAL's definition, parameter-weighted, and element-weighted); with prefill half/dense it is
    the sparsity of a thresholded token (counted while calibrating, every token thresholded), while the held-out
    sparsity counts the zeros the model makes, dense tokens included.
    """

    sparsity: float = option(0.5, ge=0.0, lt=1.0, help="target fraction of zeros: per thresholded input (uniform) or"
                             " parameter-weighted per block (greedy)")
    allocation: Literal["uniform", "greedy"] = option(
        "uniform", help="uniform: the same sparsity for every layer; greedy: TEAL's block-wise greedy search over"
        " per-projection sparsities (slower: about 7 block evaluations per step)")
    prefill: Literal["all", "half", "dense"] = option(
        "all", help="which tokens of an input with S tokens (its second-to-last axis) are thresholded: all = every"
        " token; half = positions >= S // 2 (TEAL's quality path); dense = none when S > 1, the token when S = 1"
        " (TEAL's speed path: dense prefill, sparse decode)")
    calib_rounds: int = option(1, ge=1, le=10, help="passes over the calibration data; each re-calibrates from the"
                               " thresholds the previous one ended with")
    calib_bits: int = option(8, ge=2, le=12, help="histogram resolution: 2^calib_bits bins per octave of |x|"
                             " (relative quantile error <= 2^-calib_bits)")
    greedy_step: float = option(0.05, gt=0.0, le=0.5, help="greedy: sparsity step of a projection as large as the"
                                " block's first one (step_p = greedy_step / w_p; TEAL: 0.05)")
    greedy_samples: int = option(2, ge=1, help="greedy: calibration sequences the search runs each block on")
    greedy_error: Literal["residual", "normalized"] = option(
        "residual", help="greedy: the block output error a step is scored by: residual = L2 norm over hidden of the"
        " output difference (TEAL); normalized = of the outputs each divided by its RMS over hidden first (what the"
        " next block's norm reads; on Gemma 3 270M a little lower perplexity at 0.4 and 0.5, not at 0.25:"
        " benchmarks/results/teal_quality.md)")
    greedy_table: str = option("search", help="greedy: 'search' runs the search; or an artifact directory whose"
                               " report holds a teal greedy table of this model searched up to at least this"
                               " sparsity: its rows are looked up, no search (TEAL: one table for every target)")
    scope: Literal["blocks", "all"] = option("blocks", help="blocks: linears inside numbered blocks (not the LM"
                                             " head); all: every weight layer matched by targets")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the weight layers to"
                                " threshold; empty = every candidate in scope")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave dense (applied last)")

    def __post_init__(self):
        super().__post_init__()
        if self.greedy_table != "search" and self.allocation != "greedy":
            raise UsageError("teal: greedy_table=DIR needs allocation=greedy (it reuses a greedy table)")


def _candidates(gm: fx.GraphModule, cfg: TealConfig, matcher: TargetMatcher) -> list[WeightLayer]:
    out = []
    for layer in weight_layers(gm):
        if is_rotation(layer):
            continue
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
    reader = {la.node: _token_site(la, cfg.prefill) for la in layers}
    groups: dict[fx.Node, list[WeightLayer]] = {}
    for layer in layers:
        groups.setdefault(reader[layer.node][0], []).append(layer)
    sites = ThresholdSites(gm, [(x, [(reader[la.node][1], la.module) for la in g]) for x, g in groups.items()],
                           "sparsec_teal", cfg.calib_bits)
    site_of = {la.node: (site, j) for site, g in zip(sites.sites, groups.values()) for j, la in enumerate(g)}
    numel = {la.node: weight_numel(gm, la) for la in layers}
    target = {la.node: cfg.sparsity for la in layers}
    tables = []
    try:
        if cfg.allocation == "greedy" and cfg.sparsity > 0:
            tables = (greedy_search(gm, sites, layers, site_of, numel, ctx, cfg) if cfg.greedy_table == "search"
                      else tables_from(cfg.greedy_table, layers, cfg.sparsity))
            for table in tables:
                row = pick_row(table, cfg.sparsity)
                for module, p in zip(table["modules"], row[2]):
                    target[next(la.node for la in layers if la.module == module)] = p
        targets = [[target[la.node] for la in g] for g in groups.values()]
        if cfg.sparsity > 0:
            with progress.task("teal: calibrate"):
                sites.calibrate(ctx.forward_loop, targets, cfg.calib_rounds)
        else:
            for site in sites.sites:
                for t in site.thresholds:
                    t.fill_(0.0)
    finally:
        sites.remove_observers()
    if cfg.prefill != "all":
        _apply_prefill(gm, [r for _, r in reader.values()], cfg.prefill)

    from sparsec.passes.relufy import find_activations

    gates = {linear_source(a.input)[1] for a in find_activations(gm) if linear_source(a.input)}
    entries, zeros, total, wsum, wzero = [], 0, 0, 0.0, 0.0
    for la in layers:  # graph order
        site, j = site_of[la.node]
        measured = site.measured()[j] if cfg.sparsity > 0 else None
        entry = {"module": la.module, "op": "teal", "threshold": float(site.thresholds[j]),
                 "target_sparsity": round(target[la.node], 6), "measured_sparsity": None if measured is None
                 else round(measured, 6), "weight_numel": numel[la.node]}
        if fused_names(la.node, gates):
            entry["fused"] = fused_names(la.node, gates)
        if measured is not None:
            zeros, total = zeros + site.zeros[j], total + site.numel
            wsum, wzero = wsum + numel[la.node], wzero + numel[la.node] * measured
        entries.append(entry)
    stats = {"thresholds": len(layers), "tensors_calibrated": len(sites.sites), "target_sparsity": cfg.sparsity,
             "allocation": cfg.allocation,
             "measured_sparsity": round(zeros / total, 6) if total else None,
             "measured_sparsity_param_weighted": round(wzero / wsum, 6) if wsum else None,
             "calibration_rounds": cfg.calib_rounds if cfg.sparsity > 0 else 0,
             "definition": _SPARSITY_DEFINITION if cfg.prefill == "all" else _PREFILL_DEFINITION.format(cfg.prefill)}
    if tables:
        stats["greedy_table"] = tables
    return PassResult(gm, stats, entries)


def fused_names(linear: fx.Node, gates: set) -> list[str]:
    """The projections a fused linear computes, in output order (see TealConfig); [] for an unfused one. ``gates``:
    the pieces activations read; when not exactly one of two pieces is, the gate is the one not multiplied directly
    (an activation the pass before rewrote: fatrelu, shifted)."""
    pieces = output_pieces(linear)
    if len(pieces) == 3:
        return ["q", "k", "v"]
    if len(pieces) == 2:
        if sum(p in gates for p in pieces) != 1:
            gates = {p for p in pieces if not any(u.target is aten.mul.Tensor for u in p.users)}
        if sum(p in gates for p in pieces) == 1:
            return ["gate" if p in gates else "up" for p in pieces]
    return [f"piece{i}" for i in range(len(pieces))]


def _token_site(layer: WeightLayer, prefill: str) -> tuple[fx.Node, fx.Node]:
    """(tensor to threshold, the node that reads it) for ``layer``: its input and the layer itself; for prefill
    half/dense, when that input flattens batch and tokens ([batch * S, K] from [batch, S, K], GPT-2's Conv1D), the
    unflattened tensor and the flattening, so the token axis is the second-to-last."""
    x = layer.input
    if prefill == "all":
        return x, layer.node
    rank = _rank(x)
    if x.op == "call_function" and x.target in _FLATTEN and rank == 2 and (_rank(x.args[0]) or 0) >= 3 \
            and x.meta["val"].shape[-1] == x.args[0].meta["val"].shape[-1]:
        if len(x.users) == 1:
            return x.args[0], x
        rank = None
    if rank is None or rank < 2:
        raise UsageError(f"teal: prefill={prefill} needs the token axis (second-to-last, [batch, tokens, features]) on"
                         f" the input of every thresholded layer, and '{layer.module}' has none there; use prefill=all"
                         f" or leave the layer out with ignore={{{layer.module}}}")
    return x, layer.node


def _apply_prefill(gm: fx.GraphModule, readers: list[fx.Node], mode: str) -> None:
    """Turn the sparsec::threshold each of ``readers`` reads into sparsec::threshold_prefill(x, t, mode)."""
    from sparsec.ops import THRESHOLD, THRESHOLD_PREFILL

    for r in readers:
        thr = next(a for a in r.all_input_nodes if a.op == "call_function" and a.target is THRESHOLD)
        thr.target, thr.args = THRESHOLD_PREFILL, (*thr.args, mode)
    gm.recompile()


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


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


def tables_from(path: str, layers: list[WeightLayer], sparsity: float) -> list[dict]:
    """The greedy tables in the report of the artifact ``path``, checked against this model's layers and target."""
    from sparsec.artifact import read_artifact

    report = read_artifact(path, load_program=False).report
    tables = next((p["stats"]["greedy_table"] for p in report["passes"]
                   if p.get("name") == "teal" and "greedy_table" in p.get("stats", {})), None)
    if tables is None:
        raise UsageError(f"teal: greedy_table='{path}': its report has no teal greedy table; make one with"
                         " 'teal{allocation=greedy sparsity=P}' (P at least the highest target you will look up)")
    ours = [la.module for la in layers if block_of(la.module) is not None]
    theirs = [m for t in tables for m in t["modules"]]
    if theirs != ours:
        raise UsageError(f"teal: greedy_table='{path}': its greedy table is for other layers ({len(theirs)}, first"
                         f" {theirs[0] if theirs else None}) than the {len(ours)} this pass thresholds (first"
                         f" {ours[0] if ours else None}); search again (greedy_table=search) or use the same model and"
                         " targets")
    reach = min(t["rows"][-1][0] for t in tables)
    if reach < sparsity:
        raise UsageError(f"teal: greedy_table='{path}': its greedy table reaches sparsity {reach:g}, below the target"
                         f" {sparsity:g}; search at sparsity >= {sparsity:g} (greedy_table=search) or lower the target")
    return tables


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


def _token_dim(value, tokens: int) -> int | None:
    """The dimension of an activation that holds the token positions: its last one of size ``tokens`` other than the
    last dimension (hidden). None for values without one."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    return next((d for d in range(value.dim() - 2, -1, -1) if value.shape[d] == tokens), None)


def _tail(value, tokens: int, keep: int):
    """``value`` on its last ``keep`` token positions (a view; tuples element-wise; values without a token dimension
    whole)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_tail(v, tokens, keep) for v in value)
    d = _token_dim(value, tokens)
    return value if d is None else value.narrow(d, tokens - keep, keep)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _rms_normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)


def _block_error(out: list, ref: list, normalized: bool = False) -> float:
    """TEAL's greedy error on the last 25% of tokens (``out``/``ref``: the block's outputs restricted to them, see
    :attr:`_BlockEval.ref`): L2 norm over hidden of the difference, mean over batch and tokens (summed over the
    block's floating outputs of rank >= 2). ``normalized``: of the outputs each divided by its root mean square over
    hidden (per token) first, i.e. the error as the next block's RMSNorm / LayerNorm sees it (up to its scale)."""
    err = 0.0
    for o, r in zip(out, ref):
        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dim() >= 2:
            o, r = o.float(), r.float()
            if normalized:
                o, r = _rms_normalized(o), _rms_normalized(r)
            err += float((o - r).norm(dim=-1).mean())
    return err


class _BlockEval:
    """One block on one batch of its inputs, re-running only what a change of one threshold affects.

    ``values`` holds every node's value at the thresholds in force (dense when constructed). :meth:`outputs` for
    consumer ``p`` re-runs only the nodes downstream of p's threshold, and runs on the last quarter of the tokens
    (all the error reads) every node whose restriction was verified here, on this block and batch: run on the
    restricted values of its inputs, it reproduced the restriction of its full value exactly (torch.equal).
    Position-wise nodes (projections, norms, MLP, residuals) pass; nodes that mix positions (attention) do not,
    run on all tokens, and so do their dirty inputs. The errors are therefore those of a full evaluation.
    """

    def __init__(self, sub: fx.GraphModule, inputs: list, thresholds: list[torch.Tensor]):
        from sparsec.ops import THRESHOLD

        self.interp = fx.Interpreter(sub)
        self.nodes = [n for n in sub.graph.nodes if n.op not in ("placeholder", "output")]
        self.results = list(sub.graph.output_node().args[0])
        self.values = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], inputs))
        for n in self.nodes:
            self.values[n] = self._run(n, self.values.__getitem__)
        first = next(self.values[r] for r in self.results if isinstance(self.values[r], torch.Tensor)
                     and self.values[r].is_floating_point() and self.values[r].dim() >= 2)
        self.tokens = int(first.shape[-2])
        self.keep = max(1, self.tokens // 4)
        self.ref = self.error_tails({})
        restricted = set()
        for n in self.nodes:
            if n.op == "get_attr":
                continue
            try:
                value = self._run(n, self._restricted_input({}, {}))
            except Exception:  # a shape the restriction breaks (reshape to the full length, ...): runs on all tokens
                continue
            if _same(value, self._tail(self.values[n])):
                restricted.add(n)
        for r in self.results:  # the error reads dim -2: a restricted output must have its tokens there
            v = self.values[r]
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and _token_dim(v, self.tokens) != v.dim() - 2:
                restricted.discard(r)
        self.plans = []
        for buf in thresholds:
            getter = next(n for n in self.nodes if n.op == "get_attr" and self.values[n] is buf)
            start = next(u for u in getter.users if u.target is THRESHOLD)
            dirty = {start}
            for n in self.nodes:
                if any(a in dirty for a in n.all_input_nodes):
                    dirty.add(n)
            full = set()
            for n in reversed(self.nodes):
                if n in dirty and (n not in restricted or any(u in full for u in n.users)):
                    full.add(n)
            self.plans.append([(n, n in full) for n in self.nodes if n in dirty])

    def _run(self, n: fx.Node, value_of):
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), value_of)
        return getattr(self.interp, n.op)(n.target, args, kwargs)

    def _tail(self, value):
        return _tail(value, self.tokens, self.keep)

    def _restricted_input(self, full: dict, tail: dict):
        def value_of(a: fx.Node):
            if a in tail:
                return tail[a]
            if a.op == "get_attr":
                return self.values[a]
            return self._tail(full[a] if a in full else self.values[a])
        return value_of

    def error_tails(self, full: dict, tail: dict | None = None) -> list:
        """The block's outputs on the last quarter of the tokens (dim -2, the error's), from the re-run nodes and
        ``values``."""
        tail = tail or {}
        out = []
        for r in self.results:
            if r in tail:
                out.append(tail[r])
                continue
            v = full.get(r, self.values[r])
            ok = isinstance(v, torch.Tensor) and v.dim() >= 2
            out.append(v[..., self.tokens - self.keep:, :] if ok else v)
        return out

    def outputs(self, p: int) -> list:
        """The error tails of the block's outputs with the thresholds in force, consumer ``p``'s possibly changed."""
        full, tail = {}, {}
        restricted_input = self._restricted_input(full, tail)
        for n, on_all_tokens in self.plans[p]:
            if on_all_tokens:
                full[n] = self._run(n, lambda a: full[a] if a in full else self.values[a])
            else:
                tail[n] = self._run(n, restricted_input)
        return self.error_tails(full, tail)

    def update(self, p: int) -> None:
        """Bring ``values`` to the thresholds in force after consumer ``p``'s changed (on all tokens)."""
        for n, _ in self.plans[p]:
            self.values[n] = self._run(n, self.values.__getitem__)


@torch.no_grad()
def greedy_search(gm, sites, layers, site_of, numel, ctx, cfg) -> list[dict]:
    """TEAL's block-wise greedy allocation (METHODS.md §2) on the dense model's block inputs.

    Per block, weights w_p = parameter count of each projection relative to the block's first one, step_p =
    greedy_step / w_p; from all zeros, repeatedly raise the projection whose step adds the least block output error
    (:func:`_block_error`, normalized with greedy_error=normalized) until the effective sparsity
    sum(w_p s_p) / sum(w_p) reaches ``cfg.sparsity``. Thresholds for a candidate come from histograms of the dense
    inputs. Returns one table per block:
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
        with torch.no_grad(), progress.task("teal: greedy search inputs"):
            try:
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
    normalized = cfg.greedy_error == "normalized"
    batches = recorder.batches
    tables = []
    for b, members in progress.iterate(blocks.items(), "teal: greedy search", len(blocks)):
        sub, outside = subs[b]
        inputs = [[batch[key[n]] for n in outside] for batch in batches]
        bufs = [site_of[la.node][0].thresholds[site_of[la.node][1]] for la in members]
        hists = [site_of[la.node][0].hist for la in members]
        w = [numel[la.node] / max(numel[members[0].node], 1) for la in members]
        steps = [cfg.greedy_step / max(x, 1e-12) for x in w]

        for t in bufs:
            t.fill_(-1.0)
        evals = [_BlockEval(sub, xs, bufs) for xs in inputs]

        def error(p: int) -> float:
            errs = torch.tensor([sum(_block_error(ev.outputs(p), ev.ref, normalized) for ev in evals) / len(evals)],
                                dtype=torch.float64)
            world = all_reduce_sum(errs)  # the mean over ranks of their mean errors
            return float(errs[0]) / world

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
                e = error(p)
                bufs[p].fill_(hists[p].quantile(s[p]) if s[p] > 0 else -1.0)
                if best is None or e < best[1]:
                    best = (p, e)
            if best is None:
                break
            p, e = best
            s[p] += steps[p]
            bufs[p].fill_(hists[p].quantile(s[p]))
            for ev in evals:
                ev.update(p)
            eff = sum(wi * si for wi, si in zip(w, s)) / sum(w)
            rows.append([round(eff, 6), round(e, 6), [round(x, 6) for x in s]])
        for t in bufs:
            t.fill_(-1.0)
        tables.append({"block": b, "modules": [la.module for la in members], "weights": [round(x, 6) for x in w],
                       "rows": rows})
    return tables

