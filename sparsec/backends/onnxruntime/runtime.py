"""ONNX Runtime inference and verification of an exported model against the torch reference."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparsec.backends.ties import TIE
from sparsec.errors import SparsecError, first_line
from sparsec.inputs import check_inputs, example_inputs, load_inputs_file, onnx_input_spec, run_program

DEFAULT_RTOL = DEFAULT_ATOL = 1e-4


def onnx_session(model: str | bytes, *, threads: int | None = None, custom_ops: bool | None = None,
                 external_data_dir: str | None = None, inter_op: int | None = None):
    """An ONNX Runtime CPU session for the model file ``model`` (external data beside it is found by ORT), or for a
    serialized model (bytes; its external data is looked up in ``external_data_dir``). ``threads`` / ``inter_op``:
    ORT's intra-op / inter-op thread counts (None: ORT's default).

    ``custom_ops``: register sparsec's custom-op library (``ai.sparsec``, :mod:`.kernels`): True = always (built if
    needed), None = when it is already built, or when the model turns out to need it.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise SparsecError("running ONNX models needs onnxruntime: pip install 'sparsec[onnx]'") from None
    from sparsec.backends.onnxruntime.kernels import DOMAIN, cached_library, library_path

    named = isinstance(model, (str, os.PathLike))
    if named and not os.path.isfile(model):
        raise SparsecError(f"ONNX model '{model}' does not exist or is not a file")
    label = f"'{model}'" if named else "the model"

    def session(library: str | None):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: warnings would break the one-line error contract
        if threads:
            opts.intra_op_num_threads = threads
        if inter_op:
            opts.inter_op_num_threads = inter_op
        if external_data_dir:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          external_data_dir)
        if library:
            opts.register_custom_ops_library(library)
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])

    library = library_path() if custom_ops else cached_library() if custom_ops is None else None
    if custom_ops and library is None:
        raise SparsecError(f"{label} uses sparsec's custom ops ({DOMAIN}), which need a C++ compiler (g++) to build;"
                           " install one (or set CXX), or re-export without --sparse-kernel")
    try:
        return session(library)
    except Exception as exc:
        if custom_ops is None and library is None and DOMAIN in str(exc):
            return onnx_session(model, threads=threads, custom_ops=True, external_data_dir=external_data_dir,
                                inter_op=inter_op)
        raise SparsecError(f"ONNX Runtime cannot load {label}: {first_line(exc)[:300]}") from None


def _to_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def run_onnx(model: Any, inputs: Any, *, source: str | None = None, hint: str = "") -> dict[str, np.ndarray]:
    """Run the ONNX model (a path or an ``InferenceSession``) on ``inputs`` (a .npz / .safetensors path or a dict of
    arrays); inputs are checked against the model's inputs first (a missing ``attention_mask`` is ones; ``hint``
    ends the error about a missing input). Returns ``{output name: array}``."""
    from sparsec.calling import complete_inputs

    session = onnx_session(model) if isinstance(model, (str, os.PathLike)) else model
    if isinstance(inputs, (str, os.PathLike)):
        source, arrays = source or f"inputs file '{inputs}'", load_inputs_file(str(inputs))
    else:
        source, arrays = source or "inputs", {k: _to_numpy(v) for k, v in inputs.items()}
    arrays = complete_inputs(arrays, onnx_input_spec(session), source=source, what="the ONNX model", hint=hint)
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(names, {k: np.ascontiguousarray(arrays[k]) for k in arrays})
    except Exception as exc:
        raise SparsecError(f"ONNX Runtime failed to run the model on {source}: {first_line(exc)[:300]}") from None
    return dict(zip(names, outs))


class OnnxModel:
    """An ONNX model in an ONNX Runtime session, called as :mod:`sparsec.calling` describes: ``model(input_ids=ids)``
    or ``model({"input_ids": ids})`` (numpy arrays or torch tensors) gives :class:`~sparsec.calling.Outputs`, named
    as the exported model names them."""

    def __init__(self, path: str, *, threads: int | None = None):
        self.path = path
        self.session = onnx_session(path, threads=threads)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: dict | None = None, /, **named):
        """The outputs by name for inputs given by keyword or in one dict; numpy for numpy inputs, else torch."""
        from sparsec.calling import HOW_TO_PASS, gave_numpy, named_inputs, outputs

        named = named_inputs(() if inputs is None else (inputs,), named)
        got = run_onnx(self.session, named, source="the call", hint=HOW_TO_PASS)
        return outputs(got.values(), list(got), numpy=gave_numpy(named))


def compare_outputs(got: list, want: list, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                    attention_mask: np.ndarray | None = None) -> dict:
    """Max absolute and relative error of ``got`` vs the reference ``want`` (lists of arrays, in order).

    ``ok``: every element satisfies ``|got - want| <= atol + rtol * |want|`` (``numpy.allclose``) and the shapes
    agree. ``max_rel`` is ``max |got - want| / |want|`` over elements whose reference is not 0.
    ``attention_mask`` ([batch, seq]): outputs that start with those dims are compared only at the positions where
    it is not 0 (a padded query of a causal model attends to nothing, so its output is undefined: torch and ONNX
    Runtime fill it differently); ``padded_positions`` says how many were left out.
    """
    per, ok = [], len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = _to_numpy(g), _to_numpy(w)
        entry = {"index": i, "shape": list(w.shape)}
        if g.shape != w.shape:
            entry.update(ok=False, error=f"shape {list(g.shape)} != reference {list(w.shape)}")
            per.append(entry)
            ok = False
            continue
        if attention_mask is not None and w.shape[:2] == attention_mask.shape and not attention_mask.all():
            keep = attention_mask != 0
            g, w = g[keep], w[keep]
            entry["padded_positions"] = int((~keep).sum())
        if not np.issubdtype(w.dtype, np.floating):
            same = bool(np.array_equal(g, w))
            entry.update(ok=same, max_abs=0.0 if same else float("inf"), max_rel=0.0 if same else float("inf"))
        else:
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            diff = np.abs(g64 - w64)
            nz = w64 != 0
            entry["max_abs"] = float(diff.max()) if diff.size else 0.0
            entry["max_rel"] = float((diff[nz] / np.abs(w64[nz])).max()) if nz.any() else 0.0
            bad = ~np.isclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True)
            entry["mismatched"] = int(bad.sum())
            entry["ok"] = not bad.any()
        ok = ok and entry["ok"]
        per.append(entry)
    return {"ok": bool(ok), "rtol": rtol, "atol": atol,
            "max_abs": max((e.get("max_abs", float("inf")) for e in per), default=0.0),
            "max_rel": max((e.get("max_rel", float("inf")) for e in per), default=0.0), "outputs": per}


def decision_session(onnx_path: str, program):
    """(session, decision_of): an ONNX Runtime session of an in-memory copy of the model file ``onnx_path`` (only
    read) that also outputs every threshold's keep mask (the ``Greater`` / ``Or`` its ``Mul`` casts), and
    ``{threshold node name of program: its mask output}``. The exporter folds thresholds of one input with equal t
    into one (Gemma's q/k/v, gate/up): they share its mask. A threshold the sparse path left without a mask is not in
    ``decision_of``; ``(None, {})`` when none has one."""
    import onnx
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.sparse import _threshold_of
    from sparsec.backends.ties import threshold_nodes

    proto = onnx.load(onnx_path, load_external_data=False)
    masks = {}
    for node in ir.from_proto(proto).graph:
        found = _threshold_of(node.outputs[0]) if node.op_type == "Mul" else None
        if found is not None:
            masks[node.outputs[0].name] = found[2].name
    thresholds = threshold_nodes(program)
    decision_of = {}
    for n in thresholds:
        folded = [m.name for m in thresholds if m.name in masks and m.args[0] is n.args[0]]
        if n.name in masks or folded:
            decision_of[n.name] = masks[n.name if n.name in masks else folded[0]]
    if not decision_of:
        return None, {}
    outputs = {o.name for o in proto.graph.output}
    for name in sorted(set(decision_of.values()) - outputs):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    folder = os.path.dirname(os.path.abspath(onnx_path))
    return onnx_session(proto.SerializeToString(), external_data_dir=folder), decision_of


def _with_onnx_decisions(probe, program, module, arrays: dict, got: list, label: str, *, rtol: float, atol: float,
                         tie: float) -> dict:
    """The torch program run with ONNX Runtime's threshold decisions (``probe``: :func:`decision_session`) against
    ONNX Runtime's outputs ``got``: which decisions differ from torch's, whether all are ties, and the errors then."""
    from sparsec.backends.ties import compare_decisions, threshold_nodes

    session, decision_of = probe
    out = run_onnx(session, arrays, source=label) if session is not None else {}
    want, differ = compare_decisions(program, arrays, {n: out[v] for n, v in decision_of.items()}, module)
    cmp = compare_outputs(got, want, rtol=rtol, atol=atol, attention_mask=arrays.get("attention_mask"))
    far = [n for n, d in differ.items() if d["distance"] > tie]
    return {"ok": cmp["ok"] and not far, "tie": tie, "decisions": sum(d["count"] for d in differ.values()),
            "max_distance": max((d["distance"] for d in differ.values()), default=0.0), "not_ties": far,
            "thresholds": differ, "max_abs": cmp["max_abs"], "max_rel": cmp["max_rel"],
            "without_mask": [n.name for n in threshold_nodes(program) if n.name not in decision_of]}


def describe_run(r: dict) -> str:
    """One line on a run of :func:`verify_onnx` (``r``: one of its ``runs``)."""
    line = f"{r['inputs']}: max abs err {r['max_abs']:.3g}, max rel err {r['max_rel']:.3g}"
    ties = r.get("ties")
    if ties is None:
        return f"{line}  {'ok' if r['ok'] else 'BEYOND TOLERANCE'}"
    kind = "all ties" if not ties["not_ties"] else f"at {len(ties['not_ties'])} threshold(s) beyond a tie"
    n = ties["decisions"]
    return (f"{line} with torch's own threshold decisions; {n} decision{'s' * (n != 1)} differ{'s' * (n == 1)},"
            f" {kind} (<= {ties['max_distance']:.2g} relative from t); with ONNX Runtime's decisions: max abs err"
            f" {ties['max_abs']:.3g}  {'ok' if r['ok'] else 'BEYOND TOLERANCE'}")


def verify_onnx(onnx_path: str, program, inputs: Any = None, *, spec: list[dict] | None = None,
                rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL, shorter: bool = True,
                tie: float = TIE) -> dict:
    """Run the ONNX model in ONNX Runtime and the torch ``program`` (ExportedProgram) on the same inputs and compare.

    ``inputs``: None (the program's example inputs; with ``shorter``, also the same inputs cut to a shorter
    sequence, so that the dynamic axes are exercised; for a cached program instead a one-token step after the example
    cache and a prefill at cache length 0), a .npz / .safetensors path, or a dict of arrays; outputs at
    positions where an ``attention_mask`` input is 0 are not compared (see :func:`compare_outputs`). Inputs are
    checked against ``spec`` (default: the program's input spec). Returns ``{"ok", "max_abs", "max_rel", "runs":
    [...]}``; it does not raise when the outputs differ: check ``ok``.

    Thresholds are discontinuous (:mod:`sparsec.backends.ties`): when a run differs beyond tolerance and the program
    has thresholds, ONNX Runtime runs again on an in-memory copy of the model that also outputs its threshold masks,
    and torch runs with those decisions. The run passes when every decision that differs from torch's is a tie
    (within ``tie`` of t, relative: :data:`~sparsec.backends.ties.TIE` = 1e-5) and the outputs then match within
    tolerance; the run's ``ties`` records it (``decisions`` differing, ``max_distance``, ``not_ties``: threshold
    nodes beyond a tie, ``thresholds``: per node its module, t, count and distance, ``max_abs`` / ``max_rel`` with
    ONNX Runtime's decisions). ``max_abs`` / ``max_rel`` stay the errors with torch's own decisions.
    """
    from sparsec.artifact import input_spec
    from sparsec.backends.ties import threshold_nodes
    from sparsec.kv_cache import cache_layout

    spec = spec if spec is not None else input_spec(program)
    if inputs is None:
        base = {k: _to_numpy(v) for k, v in example_inputs(program).items()}
        sets = [("example inputs", base)]
        if shorter and cache_layout(spec) is not None:
            sets += _cached_variants(base)
        elif shorter and (short := _shorter_variant(base, spec)) is not None:
            sets.append(short)
    elif isinstance(inputs, (str, os.PathLike)):
        sets = [(f"inputs file '{inputs}'", load_inputs_file(str(inputs)))]
    else:
        sets = [("inputs", {k: _to_numpy(v) for k, v in inputs.items()})]
    session = onnx_session(onnx_path)
    module = program.module()
    probe = None
    runs = []
    for label, arrays in sets:
        check_inputs(arrays, spec, source=label, what="the artifact")
        got = run_onnx(session, arrays, source=label)
        want = run_program(program, arrays, module)
        cmp = compare_outputs(list(got.values()), want, rtol=rtol, atol=atol,
                              attention_mask=arrays.get("attention_mask"))
        cmp["inputs"] = label
        cmp["shapes"] = {k: list(v.shape) for k, v in arrays.items()}
        cmp["output_names"] = list(got)
        if not cmp["ok"] and threshold_nodes(program):
            probe = probe or decision_session(onnx_path, program)
            cmp["ties"] = _with_onnx_decisions(probe, program, module, arrays, list(got.values()), label, rtol=rtol,
                                               atol=atol, tie=tie)
            cmp["ok"] = cmp["ties"]["ok"]
        runs.append(cmp)
    return {"ok": all(r["ok"] for r in runs), "rtol": rtol, "atol": atol,
            "max_abs": max(r["max_abs"] for r in runs), "max_rel": max(r["max_rel"] for r in runs), "runs": runs}


def _cached_variants(arrays: dict[str, np.ndarray]) -> list[tuple[str, dict]]:
    """More inputs of a cached program (:mod:`sparsec.kv_cache`) from its example inputs: a one-token decode step
    after the example cache, and a prefill of the example tokens (empty cache, the logits of every position)."""
    ids = arrays["input_ids"]
    past = {k: v for k, v in arrays.items() if k.startswith("past_")}
    step = {"input_ids": np.ascontiguousarray(ids[:, -1:]), "logits_to_keep": np.zeros(1, np.int64), **past}
    prefill = {"input_ids": ids, "logits_to_keep": np.arange(ids.shape[1], dtype=np.int64),
               **{k: np.ascontiguousarray(v[:, :, :0]) for k, v in past.items()}}
    return [(f"a one-token step after the example cache (past {next(iter(past.values())).shape[2]})", step),
            (f"a prefill of the example's {ids.shape[1]} tokens (past 0)", prefill)]


def _shorter_variant(arrays: dict[str, np.ndarray], spec: list[dict]):
    """The inputs cut along every dynamic non-batch dim (e.g. the sequence) to about half, or None."""
    cut: dict[str, int] = {}
    for s in spec:
        for i, d in enumerate(s.get("shape", [])):
            if i == 0 or isinstance(d, int) or not d.get("symbol"):
                continue
            size = arrays[s["name"]].shape[i]
            if size >= 4:
                cut[d["symbol"]] = max(2, size // 2 + 1)
    if not cut:
        return None
    out = {}
    for s in spec:
        if s["name"] not in arrays:
            continue
        a = arrays[s["name"]]
        index = tuple(slice(0, cut[d["symbol"]]) if i and isinstance(d, dict) and d.get("symbol") in cut
                      else slice(None) for i, d in enumerate(s["shape"]))
        out[s["name"]] = np.ascontiguousarray(a[index])
    label = "example inputs cut to " + ", ".join(f"{k}{list(v.shape)}" for k, v in out.items())
    return label, out
