"""Progress of long work: code opens a task and advances it; the configured mode decides what stderr shows.

Long steps never print; they report here::

    with progress.task("teal: calibrate", total=n) as t:
        for ...:
            t.advance()

A task opened with ``merge=True`` (a data loop) inside a task opened without a total (``teal: calibrate``) adds
its steps to that task instead of showing on its own. Modes (:func:`configure`):

- ``auto`` (the Python API's default, as tqdm bars in transformers / llm-compressor): a tqdm bar per task while
  stderr is a terminal; nothing otherwise; notes are Python warnings.
- ``lines`` (the CLI's default): one line per finished step, ``sparsec: teal: calibrate 4/4 (1.2 s)``, one every
  30 s while a step runs (``sparsec: capture, 30 s so far``: the innermost :func:`task`, from a daemon thread),
  and notes as ``sparsec: note: ...``; bars as well on a terminal.
- ``json`` (the CLI's ``--json``): one JSON object per line for each event: ``{"event": "start" | "advance" |
  "end" | "note", "task", "done", "total", "seconds"}`` (a note has ``message`` instead).
- ``off`` (the CLI's ``--quiet``): nothing.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import warnings
from typing import Iterator

MODES = ("auto", "lines", "json", "off")
_config = {"mode": "auto", "interval": 30.0}
_stack: list["Task"] = []
_ticker: list[threading.Thread] = []


def _tick() -> None:
    """Daemon thread of lines mode: a 'so far' line for the innermost open task when it has been quiet an interval."""
    while True:
        time.sleep(min(max(_config["interval"], 0.05), 1.0))
        innermost = _stack[-1] if _stack else None
        if innermost is not None and _config["mode"] == "lines":
            innermost._heartbeat(time.perf_counter())


def configure(mode: str = "auto", *, interval: float | None = None) -> None:
    """Set how progress shows (see the module docstring); ``interval``: seconds between lines of a long step."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
    _config["mode"] = mode
    if interval is not None:
        _config["interval"] = interval


def mode() -> str:
    return _config["mode"]


def _tty() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _write(line: str) -> None:
    if _tty():
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def _event(**fields) -> None:
    _write(json.dumps(fields))


def note(message: str) -> None:
    """A one-line remark about how the work was done (not an error)."""
    m = _config["mode"]
    if m == "lines":
        _write(f"sparsec: note: {message}")
    elif m == "json":
        _event(event="note", message=message)
    elif m == "auto":
        warnings.warn(message, stacklevel=2)


def warn(message: str) -> None:
    """A warning the user should act on: ``warning: MESSAGE`` on stderr (also with --quiet), a JSON event with
    --json, a Python warning from the API (mode auto)."""
    m = _config["mode"]
    if m == "json":
        _event(event="warning", message=message)
    elif m == "auto":
        warnings.warn(message, stacklevel=2)
    else:
        _write(f"warning: {message}")


class Task:
    """A step of work; :meth:`advance` it, :meth:`finish` it (or use :func:`task`)."""

    def __init__(self, name: str, total: int | None = None):
        self.name, self.total, self.done = name, total, 0
        self.open_ended = total is None  # merging data loops add their steps to it
        self.start = self._last = time.perf_counter()
        self._bar = None
        m = _config["mode"]
        if m == "lines":
            if not _ticker:
                _ticker.append(threading.Thread(target=_tick, name="sparsec-progress", daemon=True))
                _ticker[0].start()
        if m == "json":
            _event(event="start", task=name, done=0, total=total, seconds=0.0)
        elif m in ("auto", "lines") and _tty():
            from tqdm.auto import tqdm

            fmt = None if total is not None else "{desc}: {n_fmt} [{elapsed}]"
            self._bar = tqdm(desc=name, total=total, file=sys.stderr, leave=False, bar_format=fmt)

    def _count(self) -> str:
        return f" {self.done}/{self.total}" if self.total is not None else (f" {self.done}" if self.done else "")

    def add_total(self, n: int) -> None:
        self.total = (self.total or 0) + n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        m = _config["mode"]
        if self._bar is not None:
            self._bar.update(n)
        if m == "json":
            _event(event="advance", task=self.name, done=self.done, total=self.total,
                   seconds=round(now - self.start, 3))
        elif m == "lines":
            self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        if now - self._last >= _config["interval"]:
            self._last = now
            _write(f"sparsec: {self.name}{self._count()}, {now - self.start:.0f} s so far")

    def _done(self) -> None:
        self._last = float("inf")  # no more 'so far' lines
        if self._bar is not None:
            self._bar.close()

    def finish(self) -> None:
        seconds = time.perf_counter() - self.start
        self._done()
        m = _config["mode"]
        if m == "json":
            _event(event="end", task=self.name, done=self.done, total=self.total, seconds=round(seconds, 3))
        elif m == "lines":
            _write(f"sparsec: {self.name}{self._count()} ({seconds:.1f} s)")

    def close(self) -> None:
        """End without a finished line (the step failed; its error says so)."""
        self._done()


class _Merged:
    """A data loop's view of the enclosing open-ended task."""

    def __init__(self, into: Task, total: int | None):
        self.into = into
        if total:
            into.add_total(total)

    def advance(self, n: int = 1) -> None:
        self.into.advance(n)


def start(name: str, total: int | None = None) -> Task:
    """A task outside the nesting of :func:`task` (e.g. one a pass instrument opens and finishes)."""
    return Task(name, total) if _config["mode"] != "off" else _Off()


@contextlib.contextmanager
def task(name: str, total: int | None = None, *, merge: bool = False) -> Iterator[Task]:
    """Open a step, yield it for ``advance()``, finish it on leaving (a failed step shows no finished line)."""
    if _config["mode"] == "off":
        yield _Off()
        return
    if merge and _stack and _stack[-1].open_ended:
        yield _Merged(_stack[-1], total)
        return
    t = Task(name, total)
    depth = len(_stack)
    _stack.append(t)
    try:
        yield t
    except BaseException:
        t.close()
        raise
    else:
        t.finish()
    finally:
        del _stack[depth:]


def iterate(iterable, name: str, total: int | None = None, *, merge: bool = False):
    """Yield the items of ``iterable`` inside ``task(name, total)``, advancing once per item."""
    with task(name, total if total is not None else _len(iterable), merge=merge) as t:
        for item in iterable:
            yield item
            t.advance()


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


class _Off:
    total = None
    open_ended = False

    def advance(self, n: int = 1) -> None:
        pass

    def add_total(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass
