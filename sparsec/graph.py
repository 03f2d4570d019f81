"""IR helpers over ``torch.fx`` graphs captured by ``torch.export``: module paths, targets, data-flow queries."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsec.errors import UsageError

aten = torch.ops.aten

#: ATen ops that multiply an activation by a weight matrix (linear layers, GPT-2's Conv1D addmm, convolutions).
LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
              aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}

#: Ops that pass a tensor through unchanged in value (layout, copies, eval-mode dropout).
TRANSPARENT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
                   aten.contiguous.default, aten.to.dtype, aten._to_copy.default, aten.dropout.default,
                   aten.flatten.using_ints, aten.alias.default, aten.permute.default, aten.transpose.int,
                   aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default}


def module_path(node: fx.Node) -> str:
    """The path of the innermost module this node was traced inside ('' for the model's own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, short class name) of every module enclosing the node, outermost first."""
    out = []
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((path, name.rsplit(".", 1)[-1]))
    return out


def call_nodes(gm: fx.GraphModule, ops) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]


def op_name(target) -> str:
    """'aten.linear' for torch.ops.aten.linear.default; the overload is kept when it is not 'default'."""
    name = getattr(target, "name", None)
    if callable(name):
        full = name()  # e.g. 'aten::linear' or 'aten::add.Tensor'
        return full.replace("::", ".")
    return getattr(target, "__name__", str(target))


def _through_transparent_up(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in TRANSPARENT_OPS:
        node = node.args[0]
    return node


#: Ops that split a tensor into pieces (``operator.getitem`` picks one) and ops that take one piece: how a fused
#: projection's output (Phi-3's gate_up_proj / qkv_proj, GPT-2's c_attn, GPT-NeoX's query_key_value) is taken apart.
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
             aten.unsafe_split.Tensor, aten.unsafe_split_with_sizes.default, aten.unsafe_chunk.default,
             aten.tensor_split.sections, aten.tensor_split.indices}
PIECE_OPS = {operator.getitem, aten.slice.Tensor, aten.narrow.default, aten.select.int}


def linear_source(node) -> tuple[fx.Node, fx.Node | None] | None:
    """(the linear-like op whose output ``node`` is, the piece of that output it is) through layout ops and
    split / chunk / slice / getitem; the piece is the getitem or slice nearest the linear, None for the whole
    output. None when ``node`` is not a linear's output."""
    piece = None
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in LINEAR_OPS:
            return node, piece
        if node.target in PIECE_OPS:
            piece = node
        elif node.target not in TRANSPARENT_OPS and node.target not in SPLIT_OPS:
            return None
        node = node.args[0]
    return None


def produced_by_linear(node: fx.Node) -> bool:
    """True when ``node``'s value is a linear-like op's output or a piece of it (see :func:`linear_source`)."""
    return linear_source(node) is not None


def output_pieces(linear: fx.Node) -> list[fx.Node]:
    """The pieces a fused projection's output is taken apart into, in output order (the getitem or slice nodes
    :func:`linear_source` names); [] unless every use of the output, through layout ops, is one of two or more."""
    pieces, frontier = [], [linear]
    while frontier:
        for user in frontier.pop().users:
            if user.op != "call_function":
                return []
            if user.target in TRANSPARENT_OPS:
                frontier.append(user)
            elif user.target in SPLIT_OPS and all(u.target is operator.getitem for u in user.users):
                pieces.extend(user.users)
            elif user.target in PIECE_OPS and user.target is not operator.getitem:
                pieces.append(user)
            else:
                return []
    start = {aten.slice.Tensor: 2, aten.narrow.default: 2, aten.select.int: 2, operator.getitem: 1}
    return sorted(pieces, key=lambda p: p.args[start[p.target]] if len(p.args) > start[p.target]
                  and isinstance(p.args[start[p.target]], int) else 0) if len(pieces) > 1 else []


def feeds_linear(node: fx.Node, max_depth: int = 6) -> bool:
    """True when ``node``'s value reaches a linear-like op through layout ops and elementwise gating (``mul``)."""
    frontier, depth = [node], 0
    while frontier and depth <= max_depth:
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op != "call_function":
                    continue
                if user.target in LINEAR_OPS:
                    return True
                if user.target in TRANSPARENT_OPS or user.target in (aten.mul.Tensor, aten.mul.Scalar):
                    nxt.append(user)
        frontier, depth = nxt, depth + 1
    return False


@dataclass
class TargetMatcher:
    """Targets: an exact module path (the module and everything inside it), ``re:REGEX`` (``re.match`` on the
    path) or a module class name (any enclosing module). An empty ``targets`` list selects every candidate.
    ``ignore`` uses the same forms and is applied last."""

    pass_name: str
    targets: list[str]
    ignore: list[str]
    _used: set = field(default_factory=set)

    def __post_init__(self):
        for pattern in [*self.targets, *self.ignore]:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise UsageError(f"bad regex in target '{pattern}' of pass '{self.pass_name}': {exc}") from None

    @staticmethod
    def _hit(pattern: str, path: str, classes: list[str]) -> bool:
        if pattern.startswith("re:"):
            return re.match(pattern[3:], path) is not None
        return path == pattern or path.startswith(pattern + ".") or pattern in classes

    def selects(self, node: fx.Node) -> bool:
        stack = module_stack(node)
        path = stack[-1][0] if stack else ""
        classes = [c for _, c in stack]
        hits = [t for t in self.targets if self._hit(t, path, classes)]
        self._used.update(hits)
        if self.targets and not hits:
            return False
        return not any(self._hit(i, path, classes) for i in self.ignore)

    def check_all_used(self) -> None:
        """Raise when an explicit target matched no candidate (almost always a typo in a module path)."""
        unused = [t for t in self.targets if t not in self._used]
        if unused:
            raise UsageError(f"target {unused[0]!r} of pass '{self.pass_name}' matches no candidate; targets are"
                             " module paths, 're:REGEX' or class names: run 'sparsec trace MODEL' to list them")


#: Elementwise ops an MLP intermediate is computed with between two weight layers (activations, gating, masks).
_MLP_ELEMENTWISE = TRANSPARENT_OPS | {aten.mul.Tensor, aten.mul.Scalar, aten.relu.default, aten.gelu.default,
                                      aten.silu.default, aten.mish.default, aten.where.self, aten.where.ScalarOther,
                                      aten.ge.Scalar, aten.gt.Scalar, aten.pow.Tensor_Scalar, aten.sub.Tensor,
                                      aten.tanh.default, aten.sigmoid.default, aten.abs.default}

_ACT_OPERAND = {aten.addmm.default: 1}
_WEIGHT_OPERAND = {aten.addmm.default: 2}


def activation_operand(node: fx.Node):
    """The activation argument of a linear-like op node (addmm's is arg 1: bias, input, weight; the others' arg 0)."""
    return node.args[_ACT_OPERAND.get(node.target, 0)]


def weight_operand(node: fx.Node):
    """The weight argument of a linear-like op node (addmm's is arg 2; the others' arg 1)."""
    return node.args[_WEIGHT_OPERAND.get(node.target, 1)]


def is_dequantize(node) -> bool:
    """True for a ``sparsec::dequantize`` node (a weight the quantize pass quantized)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) == "sparsec.dequantize"


def dequantize_tensors(node) -> tuple:
    """``(q, scale, offset)`` operands of a ``sparsec::dequantize`` node (offset None when it has none)."""
    offset = node.args[5] if len(node.args) > 5 else node.kwargs.get("offset")
    return node.args[0], node.args[1], offset


def _is_parameter(node) -> bool:
    node = _through_transparent_up(node)
    if isinstance(node, fx.Node) and node.op == "call_function" and (
            node.target is aten.mul.Tensor or is_dequantize(node)):  # weight * mask (prune), dequantize(q, scale)
        return all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[:2])
    return isinstance(node, fx.Node) and node.op == "get_attr"


@dataclass
class WeightLayer:
    """A matrix multiply by a parameter: the op node, its activation operand, and where it lives."""

    node: fx.Node
    input: fx.Node
    module: str
    mlp_intermediate: bool  # the input is computed elementwise from another weight layer's output


def weight_layers(gm: fx.GraphModule) -> list[WeightLayer]:
    """Every linear-like op whose second operand is a parameter (attention's q·kᵀ and p·v are not included)."""
    out = []
    for node in call_nodes(gm, LINEAR_OPS):
        if len(node.args) <= _WEIGHT_OPERAND.get(node.target, 1) or not _is_parameter(weight_operand(node)):
            continue
        x = activation_operand(node)
        if isinstance(x, fx.Node):
            out.append(WeightLayer(node, x, module_path(node), _from_weight_layer(x)))
    return out


#: Name of the module holding the rotate pass's rotation matrices (their matmuls look like weight layers).
ROTATION_HOLDER = "sparsec_rotate"


def is_rotation(layer: WeightLayer) -> bool:
    """True for a matmul by one of the rotate pass's rotations (not a layer of the model: not thresholded, pruned)."""
    return _is_rotation_node(layer.node)


def _is_rotation_node(node: fx.Node) -> bool:
    w = node.args[1] if node.target is aten.matmul.default and len(node.args) > 1 else None
    return isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).startswith(ROTATION_HOLDER + ".")


def weight_numel(gm: fx.GraphModule, layer: WeightLayer) -> int:
    """Elements of the weight matrix of ``layer`` (0 when it is not a parameter of ``gm``)."""
    node = _through_transparent_up(weight_operand(layer.node))
    per_element = 1
    if is_dequantize(node):  # dequantize(q, scale, bits, ...): 8 // bits weights per element of q
        node, per_element = node.args[0], 8 // node.args[2]
    elif node.op == "call_function" and node.target is aten.mul.Tensor:  # weight * mask (the prune pass)
        node = _through_transparent_up(node.args[0])
    try:
        return int(operator.attrgetter(node.target)(gm).numel()) * per_element
    except (AttributeError, TypeError):
        return 0


def _from_weight_layer(node: fx.Node, max_nodes: int = 64) -> bool:
    seen, frontier = set(), [node]
    while frontier and len(seen) < max_nodes:
        n = frontier.pop()
        if n in seen or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in LINEAR_OPS and not _is_rotation_node(n):
            return True
        if n.target in _MLP_ELEMENTWISE or n.target in SPLIT_OPS or n.target in PIECE_OPS \
                or getattr(n.target, "namespace", None) == "sparsec" \
                or _is_rotation_node(n):  # sparsec::threshold; a rotation of the same tensor
            frontier.extend(a for a in n.all_input_nodes)
    return False
