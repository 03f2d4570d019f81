"""Pass instruments: cross-cutting concerns (timing, IR dumps, verification) run around every pass, not in it."""
from __future__ import annotations

import os
import time

import torch.fx as fx

from sparsec.errors import SparsecError


class PassInstrument:
    """Hooks called around each pass; override what you need."""

    def before_pass(self, name: str, index: int, gm: fx.GraphModule) -> None:
        pass

    def after_pass(self, name: str, index: int, gm: fx.GraphModule, record: dict) -> None:
        """``record`` is the pass's entry in the report; instruments may add keys to it."""


class PassTiming(PassInstrument):
    """Adds ``seconds`` (wall time of the pass) to each pass record."""

    def before_pass(self, name, index, gm):
        self._start = time.perf_counter()

    def after_pass(self, name, index, gm, record):
        record["seconds"] = round(time.perf_counter() - self._start, 4)


class NodeCounts(PassInstrument):
    """Adds ``nodes_before`` / ``nodes_after`` (graph size) to each pass record."""

    def before_pass(self, name, index, gm):
        self._before = len(gm.graph.nodes)

    def after_pass(self, name, index, gm, record):
        record["nodes_before"], record["nodes_after"] = self._before, len(gm.graph.nodes)


class VerifyGraph(PassInstrument):
    """Checks the graph is well formed after each pass (``Graph.lint``); a broken graph names the pass."""

    def after_pass(self, name, index, gm, record):
        try:
            gm.graph.lint()
        except Exception as exc:
            raise SparsecError(f"pass '{name}' produced an invalid graph: {exc}") from exc


class PassProgress(PassInstrument):
    """Shows each pass as a step of :mod:`sparsec.progress` (``pass teal``); the pass's own long loops nest inside."""

    def before_pass(self, name, index, gm):
        from sparsec import progress

        self._task = progress.start(f"pass {name}")

    def after_pass(self, name, index, gm, record):
        self._task.finish()


class DumpIR(PassInstrument):
    """Writes the graph's Python code before the first pass and after every pass into ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def _write(self, filename: str, gm: fx.GraphModule) -> None:
        with open(os.path.join(self.directory, filename), "w", encoding="utf-8") as f:
            f.write(gm.print_readable(print_output=False) if hasattr(gm, "print_readable") else gm.code)

    def before_pass(self, name, index, gm):
        if index == 0:
            self._write("00-input.py", gm)

    def after_pass(self, name, index, gm, record):
        self._write(f"{index + 1:02d}-after-{name}.py", gm)


def default_instruments() -> list[PassInstrument]:
    return [PassTiming(), NodeCounts(), VerifyGraph(), PassProgress()]
