"""db-mlp: doubly biased MLP — zeroth biases per token position and restricted LayerNorm (arXiv 2309.03004; §5)."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from sparsec.config import PassConfig, option
from sparsec.errors import UsageError
from sparsec.graph import TRANSPARENT_OPS, TargetMatcher, activation_operand, module_path, weight_layers
from sparsec.passes.base import PassContext, PassResult
from sparsec.passes.regularize import mlp_producers
from sparsec.registry import register_pass
from sparsec.training import register_holder

aten = torch.ops.aten


@dataclass(frozen=True)
class DBMLPConfig(PassConfig):
    """Doubly biased MLP: a learnable zeroth bias per token position on each MLP input, and restricted LayerNorm.

    The zeroth bias (shape [positions, hidden], initialised to 0) is added to the output of the normalisation
    feeding the MLP (LayerNorm, RMSNorm) where the MLP reads it. After every optimiser step
    (sparsec.training.after_step) it is clipped to ±c·|γ|, γ that norm's scale, and the norm is restricted:
    scratch (training from scratch) drops the norm's bias and clamps γ >= 1; finetune freezes the bias and raises
    |γ| to at least min(step / uplift_steps, 1), keeping its sign. γ, the zeroth biases and a frozen norm bias
    move into the module 'sparsec_db_mlp' (gamma<i>, bias<i>, beta<i>). finetune reproduces the model bit for bit
    until trained. Reports no sparsity of its own (it emerges from training); the transform's measured effect is
    the MLP intermediate sparsity (ProSparse's definition).
    """

    c: float = option(0.1, gt=0.0, help="clip bound of the zeroth biases, in units of |γ| of the norm")
    mode: Literal["finetune", "scratch"] = option(
        "finetune", help="scratch: drop the norm bias and clamp γ >= 1; finetune: freeze the norm bias and lift |γ|"
        " over uplift_steps")
    uplift_steps: int = option(1000, ge=1, help="mode=finetune: steps over which |γ| is lifted to >= 1 (paper value"
                               " unverified)")
    positions: int = option(0, ge=0, help="token positions of the zeroth bias, the longest sequence the model will"
                            " see (0 = the example input's sequence length)")
    targets: list[str] = option([], help="module paths, 're:REGEX' or class names of the MLPs' down projections;"
                                " empty = every MLP")
    ignore: list[str] = option([], help="module paths, 're:REGEX' or class names to leave alone (applied last)")


@register_holder
class ZerothBiases(nn.Module):
    """Zeroth biases ``bias<i>``, the scales ``gamma<i>`` (and frozen biases ``beta<i>``) of the norms feeding them,
    and the options as buffers (``c``, ``finetune``, ``uplift_steps``), so the state survives torch.export."""

    holder_name = "sparsec_db_mlp"

    def __init__(self, c: float, finetune: bool, uplift_steps: int, device):
        super().__init__()
        for name, value in (("c", c), ("finetune", float(finetune)), ("uplift_steps", float(uplift_steps))):
            self.register_buffer(name, torch.tensor(value, device=device))

    def sites(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(zeroth bias, γ) of every MLP."""
        params = dict(self.named_parameters())
        return [(params[f"bias{i}"], params[f"gamma{i}"]) for i in range(sum(k.startswith("bias") for k in params))]

    def sparsec_after_step(self, step: int) -> None:
        for bias, gamma in self.sites():
            if bool(self.finetune):
                lift = min((step + 1) / float(self.uplift_steps), 1.0)
                gamma.copy_(torch.where(gamma < 0, -1.0, 1.0) * gamma.abs().clamp(min=lift))
            else:
                gamma.clamp_(min=1.0)
            bound = float(self.c) * gamma.abs()
            bias.copy_(torch.maximum(torch.minimum(bias, bound), -bound))

    def sparsec_strip(self, gm: fx.GraphModule) -> None:
        """Drop the training options; the zeroth biases and norm parameters stay (the model uses them)."""
        prefix = next(n for n, m in gm.named_modules() if m is self)
        options = {f"{prefix}.{name}" for name in ("c", "finetune", "uplift_steps")}
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target in options and not node.users:
                gm.graph.erase_node(node)
        for name in ("c", "finetune", "uplift_steps"):
            delattr(self, name)


@dataclass
class _Norm:
    output: fx.Node
    gamma: fx.Node  # get_attr of the scale
    beta: fx.Node | None  # get_attr of the bias (LayerNorm)


def _norm_feeding(x: fx.Node) -> _Norm | None:
    """The normalisation producing ``x``: aten.layer_norm / rms_norm, or a decomposed RMSNorm's ``γ · h``."""
    node = x
    while node.op == "call_function" and node.target in TRANSPARENT_OPS:
        node = node.args[0]
    if node.op != "call_function":
        return None
    if node.target in (aten.layer_norm.default, aten.rms_norm.default) and len(node.args) > 2:
        gamma = node.args[2]
        beta = node.args[3] if node.target is aten.layer_norm.default and len(node.args) > 3 else None
        if isinstance(gamma, fx.Node) and gamma.op == "get_attr":
            return _Norm(node, gamma, beta if isinstance(beta, fx.Node) else None)
    if node.target is aten.mul.Tensor:
        params = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(params) == 1:
            return _Norm(node, params[0], None)
    return None


def _move(gm: fx.GraphModule, node: fx.Node, holder: str, name: str, as_buffer: bool = False) -> None:
    """Move the tensor a get_attr node reads into the holder under ``name`` and point the node at it."""
    owner_path, _, attr = node.target.rpartition(".")
    owner = operator.attrgetter(owner_path)(gm) if owner_path else gm
    value = getattr(owner, attr)
    delattr(owner, attr)
    target = getattr(gm, holder)
    if as_buffer:
        target.register_buffer(name, value.detach().clone())
    else:
        target.register_parameter(name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    node.target = f"{holder}.{name}"


def _seq_len(x: fx.Node, cfg: DBMLPConfig) -> int:
    if cfg.positions:
        return cfg.positions
    dim = x.meta["val"].shape[-2]
    return int(dim.node.hint) if hasattr(dim, "node") else int(dim)


@register_pass("db-mlp", DBMLPConfig, after=("relufy", "jsrelu"))
def db_mlp(gm: fx.GraphModule, cfg: DBMLPConfig, ctx: PassContext) -> PassResult:
    matcher = TargetMatcher("db-mlp", cfg.targets, cfg.ignore)
    sites: dict[fx.Node, tuple[_Norm, list[fx.Node], str]] = {}  # MLP input -> (norm, producer layers, MLP path)
    for layer in weight_layers(gm):
        if not layer.mlp_intermediate or not matcher.selects(layer.node):
            continue
        for prod in sorted(mlp_producers(layer.input), key=lambda n: n.name):
            x = activation_operand(prod)
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            norm = _norm_feeding(x) if val is not None and val.dim() >= 3 else None
            if norm is not None:
                sites.setdefault(x, (norm, [], module_path(layer.node).rpartition(".")[0]))[1].append(prod)
    matcher.check_all_used()
    if not sites:
        raise UsageError("db-mlp: no MLP reads the output of a LayerNorm / RMSNorm over [batch, seq, hidden]"
                         " tensors; DB-MLP applies to transformer MLPs (see 'sparsec trace MODEL')")
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    holder = ZerothBiases.holder_name
    if hasattr(gm, holder):
        raise UsageError("db-mlp: the model already has zeroth biases (sparsec_db_mlp); run db-mlp once")
    gm.add_module(holder, ZerothBiases(cfg.c, cfg.mode == "finetune", cfg.uplift_steps, device))
    graph, layers = gm.graph, []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for i, (x, (norm, producers, mlp)) in enumerate(sorted(sites.items(), key=lambda s: order[s[0]])):
        hidden = x.meta["val"].shape[-1]
        getattr(gm, holder).register_parameter(f"bias{i}", nn.Parameter(
            torch.zeros(_seq_len(x, cfg), int(hidden), device=device, dtype=x.meta["val"].dtype)))
        _move(gm, norm.gamma, holder, f"gamma{i}")
        if norm.beta is not None:
            if cfg.mode == "finetune":
                _move(gm, norm.beta, holder, f"beta{i}", as_buffer=True)
            else:
                norm.output.update_arg(3, None)
                owner_path, _, attr = norm.beta.target.rpartition(".")
                if not norm.beta.users:
                    graph.erase_node(norm.beta)
                    delattr(operator.attrgetter(owner_path)(gm) if owner_path else gm, attr)
        with graph.inserting_before(producers[0] if order[producers[0]] < order[producers[-1]] else producers[-1]):
            bias = graph.get_attr(f"{holder}.bias{i}")
            seq = graph.call_function(aten.sym_size.int, (x, x.meta["val"].dim() - 2))
            sliced = graph.call_function(aten.slice.Tensor, (bias, 0, 0, seq))
            biased = graph.call_function(aten.add.Tensor, (x, sliced))
        for n in (bias, seq, sliced, biased):
            n.meta["nn_module_stack"] = producers[0].meta.get("nn_module_stack")
        biased.meta["val"] = x.meta["val"]
        for prod in producers:
            prod.replace_input_with(x, biased)
        layers.append({"module": mlp, "op": "db-mlp", "norm": module_path(norm.output),
                       "zeroth_bias": f"{holder}.bias{i}", "positions": _seq_len(x, cfg), "mode": cfg.mode})
    graph.lint()
    gm.recompile()
    return PassResult(gm, {"mlps": len(layers), "mode": cfg.mode, "c": cfg.c}, layers)
