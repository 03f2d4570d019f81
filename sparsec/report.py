"""Sparsity reports: per-layer measurement on held-out data, model-level sparsity under each definition, rendering.

Definitions (METHODS.md, "Sparsity definitions"), all measured as exact zeros in the transformed model:
- ``teal_param_weighted``: zeros in the inputs of the thresholded linears, each weighted by its parameter count
  (TEAL's block sparsity, over the whole model);
- ``linear_input_element_weighted``: zeros in the inputs of every weight layer, element-weighted;
- ``mlp_intermediate``: zeros in the inputs of the MLP down-projections (ProSparse);
- ``weight_bytes_skipped``: the fraction of the bytes of all weight layers a sparse kernel skips in a matrix-vector
  product (a zero input skips its weight column: sum of input sparsity x weight bytes over all weight bytes).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

#: Report keys that are not columns of the per-layer table.
_NOT_COLUMNS = ("pass", "module")


def measure_layers(gm, forward_loop: Callable) -> dict[str, dict]:
    """Run ``forward_loop`` through ``gm`` and count zeros in the input of every weight layer.

    Returns ``{module: {"input_sparsity", "mlp_intermediate", "weight_bytes"}}`` (graph order)."""
    from sparsec.graph import weight_layers, weight_numel
    from sparsec.measure import run_and_count_zeros

    acc: dict[str, list] = {}

    def model(*args, **kwargs):
        out, stats = run_and_count_zeros(gm, args, kwargs)
        first = next((v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)), None)
        weight = first.numel() if first is not None else 1
        for layer in stats["layers"]:
            a = acc.setdefault(layer["module"], [0.0, 0.0, layer["mlp_intermediate"]])
            a[0] += layer["input_sparsity"] * weight
            a[1] += weight
        return out

    model.__signature__ = inspect.signature(gm.forward)
    forward_loop(model)
    size = {la.module: weight_numel(gm, la) * _itemsize(gm) for la in weight_layers(gm)}
    return {m: {"input_sparsity": z / n if n else 0.0, "mlp_intermediate": mlp, "weight_bytes": size.get(m, 0)}
            for m, (z, n, mlp) in acc.items()}


def _itemsize(gm) -> int:
    p = next(gm.parameters(), None)
    return p.element_size() if p is not None else 4


def model_sparsity(measured: dict[str, dict], thresholded: dict[str, int]) -> dict:
    """Model-level sparsity under each definition of this module's docstring, from :func:`measure_layers`.

    ``thresholded``: parameter count of each linear a threshold feeds (teal entries), for TEAL's weighting."""
    def frac(pairs):
        pairs = list(pairs)
        den = sum(w for _, w in pairs)
        return round(sum(s * w for s, w in pairs) / den, 6) if den else None

    vals = measured.values()
    return {"teal_param_weighted": frac((measured[m]["input_sparsity"], n) for m, n in thresholded.items()
                                        if m in measured),
            "linear_input_element_weighted": frac((v["input_sparsity"], 1) for v in vals),
            "mlp_intermediate": frac((v["input_sparsity"], 1) for v in vals if v["mlp_intermediate"]),
            "weight_bytes_skipped": frac((v["input_sparsity"], v["weight_bytes"]) for v in vals)}


def add_heldout(report: dict, gm, forward_loop: Callable, source: str) -> None:
    """Measure ``gm`` on held-out data: ``heldout_sparsity`` on every per-layer entry, ``report['sparsity']``."""
    measured = measure_layers(gm, forward_loop)
    for entry in report["layers"]:
        m = measured.get(entry["module"])
        if m is not None and "threshold" in entry and entry.get("op") == "teal":
            entry["heldout_sparsity"] = round(m["input_sparsity"], 6)
    cats = {e["module"]: e for e in report["layers"] if e.get("op") in ("cats", "fatrelu")}
    if cats:  # the activation output is not a weight-layer input: the down-projection after it shows its zeros
        downs = [m for m, v in measured.items() if v["mlp_intermediate"]]
        for entry, down in zip(cats.values(), downs):
            entry["heldout_sparsity"] = round(measured[down]["input_sparsity"], 6)
    thresholded = {e["module"]: e.get("weight_numel", 0) for e in report["layers"] if e.get("op") == "teal"}
    report["sparsity"] = {"heldout_data": source, **model_sparsity(measured, thresholded)}


# ------------------------------------------------------------------------------------------------- rendering


def layer_table(layers: list[dict]) -> list[str]:
    """The per-layer entries as text rows; columns are the keys present in any entry (so any pass's entries show)."""
    if not layers:
        return []
    cols = []
    for layer in layers:
        cols.extend(k for k in layer if k not in _NOT_COLUMNS and k not in cols and not isinstance(layer[k], (dict,
                                                                                                              list)))
    rows = [["module", "pass", *cols]]
    for layer in layers:
        rows.append([str(layer.get("module", "")), str(layer.get("pass", ""))] + [_cell(layer.get(k)) for k in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_layers(layers: list[dict], path: str) -> None:
    """A per-layer chart of target, calibration and held-out sparsity, written to ``path`` (PNG)."""
    try:
        import matplotlib
    except ImportError:
        from sparsec.errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'sparsec[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in layers if e.get("measured_sparsity") is not None or e.get("target_sparsity") is not None]
    if not rows:
        from sparsec.errors import UsageError

        raise UsageError("the artifact's report has no per-layer sparsity to plot (no calibrated pass ran)")
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(rows)), 4.0))
    for key, label, style in (("target_sparsity", "target", "k--"), ("measured_sparsity", "calibration data", "o-"),
                              ("heldout_sparsity", "held-out data", "s-")):
        ys = [e.get(key) for e in rows]
        if any(y is not None for y in ys):
            ax.plot(list(x), [float("nan") if y is None else y for y in ys], style, label=label, markersize=3)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("per-layer activation sparsity")
    fig.tight_layout()
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.png",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
