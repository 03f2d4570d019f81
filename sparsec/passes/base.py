"""What every pass gets and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx


@dataclass
class PassContext:
    """What a pass may use besides the graph: the example inputs and, for calibrating passes, ``forward_loop``.

    ``forward_loop(model)`` runs the model over the calibration data (the llm-compressor / modelopt contract).
    """

    args: tuple
    kwargs: dict
    forward_loop: Callable[[Any], None] | None = None
    index: int = 0  # position of the running pass in the pipeline (0-based)
    previous: list[str] = field(default_factory=list)  # names of the passes that already ran


@dataclass
class PassResult:
    """The rewritten graph, summary statistics, and per-layer entries ``{module, op, ...}`` for the report.

    ``unchanged``: what the pass looked for and did not find, for the warning when it changes nothing in the model
    ("no MLP activation to replace (looked for ...)").
    """

    gm: fx.GraphModule
    stats: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    unchanged: str = ""
