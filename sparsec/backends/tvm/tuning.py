"""Per-CPU schedules of sparsec's CPU linear kernels: measured at compile time, kept in a database on disk.

A schedule of :func:`sparsec.backends.tvm.kernels.linear_kernel` is three numbers:

* ``rows_per_pass``: surviving input rows the GEMV (a decode step) accumulates per pass, 2, 4, 8 or 16;
* ``tiles_per_thread``: column tiles per thread, 1, 2 or 4 (more tiles: shorter tasks, more of them);
* ``group``: GEMM (prefill) panels copied per task, 1, 2 or 4.

A quantized kernel's (:func:`sparsec.backends.tvm.quantized.quantized_linear_kernel`, int8 / int4 weights) is
one number, its decode's ``rows_per_pass``: 2, 4, 8 or 16 per output channel, 4, 8, 16 or 32 group-wise (its tiles
are fixed by the packed layout, which a tied embedding shares; its GEMM keeps its default).

A :class:`Scheduler` gives the schedule of each kernel of a build (``k``, ``n``, dtype, kind: dense, sparse or
threshold, as :func:`sparsec.backends.tvm.lower.input_kind` names them): from the database when it holds one for this
CPU, thread count, shape, dtype and kind; else, with a time budget (``sparsec compile --tune-seconds``, default
:func:`default_seconds`), measured here: the default first, then the GEMV candidates at 50 % sparsity (all inputs for a
dense kernel; :func:`bench_inputs`) on one token, each call after the caches are flushed (as a decode step streams its
weights from memory; without the flush a 16-46 MB layer is partly timed from the L3 cache), then the GEMM groups on 128
tokens, keeping the fastest (medians of interleaved calls); else the default.
Tuning never changes what a kernel computes, only how: every candidate is the same kernel family.

The database is one JSON file (``SPARSEC_TUNING_DB``, default ``~/.cache/sparsec/tuning.json``):
``{"format": "sparsec-tuning", "version": 2, "entries": {key: {"rows_per_pass", "tiles_per_thread", "group",
"gemv_us", "default_gemv_us", "gemm_us", "default_gemm_us"}}}`` with key ``cpu|threads|KxN|dtype|kind`` (a quantized
kernel: ``{"rows_per_pass", "gemv_us", "default_gemv_us"}``, its dtype the weight format and the activations' dtype,
``int4g32s16_float32``). An entry that is not a valid schedule, or a file that is not such a database, is ignored
with a one-line warning (and a damaged file is not written over). A version 1 file is an earlier sparsec's, whose
tuner could record a schedule it had measured slower than the default (with a short budget it compared the first
candidate alone): its entries are dropped, with one warning, and measured again.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from sparsec import progress

FORMAT, VERSION = "sparsec-tuning", 2
#: seconds per kernel not in the database that ``sparsec compile`` measures by default (Zen 4, 2 cores: Gemma 3 270M
#: after rotate,teal has 7 kernels, tuned in 33 s, 19 of them its 262144-column LM head; later builds read the database)
DEFAULT_SECONDS = 2.0
SUPERSEDED = (1,)  # versions whose entries are dropped and measured again
ROWS_PER_PASS = (2, 4, 8, 16)
TILES_PER_THREAD = (1, 2, 4)
GROUPS = (1, 2, 4)
SPLITS = (1, 2, 4)
GEMM_TOKENS = 128
KINDS = ("dense", "sparse", "threshold")  # the lowering's input kinds (sparsec.backends.tvm.lower.input_kind)
#: a quantized kernel's candidate rows per pass, per output channel (group 0) and group-wise
QUANTIZED_ROWS_PER_PASS = {"channel": (2, 4, 8, 16), "group": (4, 8, 16, 32)}


def _env_number(name: str, default: float, what: str) -> float:
    """The number >= 0 the environment variable ``name`` holds, else ``default``; one usage line if it holds
    anything else (``what``: what it must be, and an example)."""
    from sparsec.errors import UsageError

    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:  # (also NaN)
        raise UsageError(f"{name} must be {what}, got {value!r}: set it to {default:g}, or unset it")
    return number


def default_seconds() -> float:
    """The default tuning budget per kernel (``sparsec compile --tune-seconds``): ``SPARSEC_TUNE_SECONDS`` when set,
    else :data:`DEFAULT_SECONDS`."""
    return _env_number("SPARSEC_TUNE_SECONDS", DEFAULT_SECONDS, "a number of seconds >= 0 (0: no tuning)")


def max_other_load(threads: int) -> float:
    """Cores other processes may keep busy while kernels on ``threads`` threads are timed (``SPARSEC_TUNE_MAX_LOAD``,
    default: the cores those threads leave idle, plus a quarter of one)."""
    return _env_number("SPARSEC_TUNE_MAX_LOAD", max(0, (os.cpu_count() or 1) - threads) + 0.25,
                       "a number of cores >= 0")


def database_path() -> str:
    return os.environ.get("SPARSEC_TUNING_DB") or os.path.join(os.path.expanduser("~"), ".cache", "sparsec",
                                                               "tuning.json")


def entry_key(cpu: str, threads: int, k: int, n: int, dtype: str, kind: str) -> str:
    return f"{cpu}|{threads}|{k}x{n}|{dtype}|{kind}"


def quantized_rows(dtype: str) -> tuple | None:
    """The candidate rows per pass of a quantized kernel's key dtype (``int8g0_float32``: per channel), or None for
    a float kernel's."""
    if not dtype.startswith("int"):
        return None
    return QUANTIZED_ROWS_PER_PASS["channel" if dtype.split("_")[0].split("g")[1].startswith("0") else "group"]


def tiles_candidates(key: str) -> tuple:
    """The tiles per thread a float kernel's schedule may have under database ``key``: :data:`TILES_PER_THREAD`, and
    its default's (more for a wide layer: a 262144-column LM head on 2 threads has 16 tiles per thread)."""
    try:
        _, threads, shape = key.split("|")[:3]
        k, n = (int(v) for v in shape.split("x"))
        default = default_schedule(k, n, int(threads))["tiles_per_thread"]
    except ValueError:  # not a key this sparsec writes
        return TILES_PER_THREAD
    return TILES_PER_THREAD + (() if default in TILES_PER_THREAD else (default,))


def _valid(entry, rows: tuple | None, tiles: tuple) -> bool:
    """Whether ``entry`` is a schedule: of a quantized kernel when ``rows`` (its candidates) is given, else a float
    one's with ``tiles`` per thread."""
    if not isinstance(entry, dict):
        return False
    if rows is not None:
        return entry.get("rows_per_pass") in rows
    return (entry.get("rows_per_pass") in ROWS_PER_PASS and entry.get("tiles_per_thread") in tiles
            and entry.get("group") in GROUPS and entry.get("splits", 1) in SPLITS)


class Database:
    """The tuning database at ``path`` (default :func:`database_path`), read once; :meth:`save` writes it back
    atomically, unless the file on disk was damaged."""

    def __init__(self, path: str | None = None):
        self.path = path or database_path()
        self.entries: dict = {}
        self.writable = True
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") in SUPERSEDED:
                progress.warn(f"ignoring the entries of the tuning database '{self.path}' (version {data['version']},"
                              " an earlier sparsec's tuner): kernels take the default schedule, or are measured"
                              " again and recorded when tuning")
                return
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION \
                    or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a {FORMAT} version {VERSION} file")
        except (OSError, ValueError) as exc:
            progress.warn(f"ignoring the tuning database '{self.path}' ({exc}); schedules are measured"
                          " or default, and the file is left as it is")
            self.writable = False
            return
        self.entries = data["entries"]

    def get(self, key: str) -> dict | None:
        """The schedule stored under ``key``, or None (with a warning when the entry is not a valid schedule)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        rows = quantized_rows(key.split("|")[3]) if key.count("|") == 4 else None
        tiles = TILES_PER_THREAD if rows else tiles_candidates(key)
        if not _valid(entry, rows, tiles):
            valid = (f"rows_per_pass in {rows}" if rows else f"rows_per_pass in {ROWS_PER_PASS}, tiles_per_thread in"
                     f" {tiles}, group in {GROUPS}, splits in {SPLITS}")
            progress.warn(f"ignoring tuning database entry '{key}' in '{self.path}': not a schedule of"
                          f" this sparsec ({valid})")
            return None
        schedule = {name: entry.get(name) for name in ("rows_per_pass", "tiles_per_thread", "group")}
        return schedule if rows else {**schedule, "splits": entry.get("splits", 1)}  # (version 2's first entries)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry

    def save(self) -> None:
        if not self.writable:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, "entries": self.entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def kernel_args(k: int, n: int, schedule: dict, threads: int) -> dict:
    """The keyword arguments of :func:`~sparsec.backends.tvm.kernels.linear_kernel` (and ``tiles`` of
    :func:`~sparsec.backends.tvm.kernels.pack_weight`) for ``schedule``: ``tiles_per_thread`` counts the GEMV's
    tasks, so a tile split in ``splits`` makes ``splits`` times fewer tiles."""
    from sparsec.backends.tvm.kernels import VL, R, num_tiles

    splits = schedule.get("splits") or 1
    tiles = num_tiles(n, threads)
    if schedule.get("tiles_per_thread"):
        tiles = max(1, min(threads * schedule["tiles_per_thread"] // splits, n // VL))
    return {"tiles": tiles, "rows_per_pass": schedule.get("rows_per_pass") or R,
            "group": schedule.get("group"), "splits": splits}


def bench_inputs(k: int, kind: str, tokens: int, generator) -> tuple:
    """``(x [tokens, k] fp32, threshold)`` on which a kernel of ``kind`` is timed: half of the first token's inputs
    dropped (zeros for a ``sparse`` kernel, under the threshold for a ``threshold`` one), all kept for ``dense``."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"kernel kind must be one of {', '.join(KINDS)}, got {kind!r}")
    x = torch.randn(tokens, k, generator=generator)
    thr = float(x[0].abs().median()) if kind == "threshold" else 0.0
    if kind == "sparse":
        x[0, torch.randperm(k, generator=generator)[: k // 2]] = 0
    return x, thr


class _Bench:
    """One kernel shape on this CPU: builds candidates and times them on the same inputs."""

    def __init__(self, k: int, n: int, dtype: str, kind: str, threads: int):
        import torch

        from sparsec.backends.tvm.env import import_tvm

        self.tvm = import_tvm()
        self.k, self.n, self.dtype, self.kind, self.threads = k, n, dtype, kind, threads
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(n, k, generator=g).to(getattr(torch, dtype))
        x, thr = bench_inputs(k, kind, GEMM_TOKENS, g)
        self.x1, self.xm = self._tensor(x[:1]), self._tensor(x)
        self.thr, self.b = self._tensor(torch.tensor([thr])), self._tensor(torch.zeros(n))
        self.y1 = self.tvm.runtime.empty((1, n), dtype)
        self.ym = self.tvm.runtime.empty((GEMM_TOKENS, n), dtype)

    def _tensor(self, t):
        """``t`` (torch) as a TVM tensor of the kernel's dtype (bfloat16 through its bit pattern)."""
        import torch

        t = t.to(getattr(torch, self.dtype)).contiguous()
        array = t.view(torch.int16).numpy().view("uint16") if self.dtype == "bfloat16" else t.numpy()
        return self.tvm.runtime.empty(tuple(t.shape), self.dtype).copyfrom(array)

    def build(self, schedule: dict):
        """``(call on one token, call on GEMM_TOKENS)`` of the kernel with ``schedule``, or None if it is invalid."""
        from sparsec.backends.tvm.env import cpu_target
        from sparsec.backends.tvm.kernels import linear_kernel, pack_weight

        args = kernel_args(self.k, self.n, schedule, self.threads)
        try:
            func = linear_kernel(self.k, self.n, self.dtype, sparse=self.kind != "dense",
                                 threshold=self.kind == "threshold", **args)
        except ValueError:
            return None
        f = self.tvm.compile(func.with_attr("global_symbol", "main"), cpu_target())["main"]
        wp = self._tensor(pack_weight(self.w, tiles=args["tiles"]))
        return (lambda: f(self.x1, wp, self.thr, self.b, self.y1)), (lambda: f(self.xm, wp, self.thr, self.b, self.ym))


def eviction_bytes() -> int:
    """Bytes to read to push a kernel's weights out of the CPU caches: twice the last-level cache, at least 96 MB
    (a 2-vCPU guest may see the host's whole L3: 300 MiB on an Emerald Rapids)."""
    from sparsec.backends.tvm.env import last_level_cache_bytes

    return max(96 << 20, 2 * last_level_cache_bytes())


def _evict_caches():
    """A callable that pushes the kernels' weights out of the CPU caches (reads :func:`eviction_bytes`): a decode step
    streams each layer's weights from memory, so that is how a GEMV candidate is timed."""
    import numpy as np

    return np.ones(eviction_bytes() // 8).sum


def _fastest(calls: dict, seconds: float, reps: int = 15, before=None) -> dict:
    """Median seconds of each of ``calls`` (name -> callable), interleaved, within about ``seconds``; ``before``
    (untimed) runs before each call."""
    for f in calls.values():
        f()
    times = {name: [] for name in calls}
    stop = time.perf_counter() + seconds
    for i in range(reps):
        for name, f in calls.items():
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
        if i >= 2 and time.perf_counter() > stop:
            break
    return {name: statistics.median(v) for name, v in times.items()}


def default_schedule(k: int, n: int, threads: int, tiles_per_thread: int | None = None, splits: int = 1) -> dict:
    """The kernels' own schedule for ``W [n, k]`` on ``threads`` threads as concrete values: ``R`` rows per pass,
    :func:`~sparsec.backends.tvm.kernels.num_tiles` tiles, unsplit (or ``tiles_per_thread`` GEMV tasks per thread,
    each tile in ``splits``), :func:`~sparsec.backends.tvm.kernels.panel_group` panels per task for those tiles."""
    from sparsec.backends.tvm.kernels import R, gemm_columns, panel_group, tile_width

    tiles = kernel_args(k, n, {"tiles_per_thread": tiles_per_thread, "splits": splits}, threads)["tiles"]
    ct = tile_width(n, tiles)
    return {"rows_per_pass": R, "tiles_per_thread": tiles_per_thread or max(1, tiles // threads),
            "group": panel_group(k, ct, gemm_columns(ct)), "splits": splits}


def gemv_candidates(default: dict) -> list:
    """The GEMV schedules ``(rows_per_pass, tiles_per_thread, splits)`` tuning builds, in order, while its budget
    lasts: the default first, then its tasks as halves of tiles twice as wide, then other rows per pass (the likeliest
    gains), then more tiles."""
    rows = (default["rows_per_pass"],) + tuple(r for r in sorted(ROWS_PER_PASS, reverse=True)
                                                if r != default["rows_per_pass"])
    tiles = (default["tiles_per_thread"],) + tuple(t for t in TILES_PER_THREAD if t != default["tiles_per_thread"])
    return [(r, t, s) for t in tiles for r in rows for s in SPLITS[:2]]


def tune(k: int, n: int, dtype: str, kind: str, threads: int, seconds: float) -> dict:
    """Measure schedules of one kernel on this CPU for about ``seconds``; the fastest, with its timings (µs).

    The default schedule is always a candidate (the first built and, for the GEMM, the first group): a budget too
    short to build or time the others keeps it, so tuning never records a schedule it measured slower."""
    start = time.perf_counter()
    bench = _Bench(k, n, dtype, kind, threads)
    default = default_schedule(k, n, threads)
    built = {}
    for r, t, s in gemv_candidates(default):
        if built and time.perf_counter() - start > seconds / 2:
            break
        calls = bench.build({"rows_per_pass": r, "tiles_per_thread": t, "group": None, "splits": s})  # (no GEMM)
        if calls is not None:
            built[(r, t, s)] = calls
    gemv = _fastest({key: c[0] for key, c in built.items()}, seconds / 4, before=_evict_caches())
    best = min(built, key=lambda key: gemv[key])
    choice = {"rows_per_pass": best[0], "tiles_per_thread": best[1], "splits": best[2]}
    own = default_schedule(k, n, threads, choice["tiles_per_thread"], choice["splits"])["group"]  # for these tiles
    groups = {}
    for g in (own,) + tuple(g for g in GROUPS if g != own):
        if groups and time.perf_counter() - start > seconds:
            break
        calls = bench.build({**choice, "group": g})
        if calls is not None:
            groups[g] = calls[1]
    gemm = _fastest(groups, max(0.0, seconds - (time.perf_counter() - start)), reps=5)
    group = min(groups, key=lambda g: gemm[g])
    default_key = (default["rows_per_pass"], default["tiles_per_thread"], default["splits"])
    return {**choice, "group": group, "gemv_us": round(gemv[best] * 1e6, 1),
            "default_gemv_us": round(gemv[default_key] * 1e6, 1),
            "gemm_us": round(gemm[group] * 1e6, 1), "default_gemm_us": round(gemm[own] * 1e6, 1)}


def tune_quantized(k: int, n: int, bits: int, group: int, scale_dtype: str, offsets: bool, kind: str,
                   seconds: float) -> dict:
    """Measure the rows per pass of one quantized kernel's decode on this CPU for about ``seconds`` (one token, half
    of its inputs dropped unless ``kind`` is dense, caches flushed before each call); the fastest, with its timings
    (µs; ``default_gemv_us``: the kernel's own default)."""
    import torch

    from sparsec.backends.tvm.env import cpu_target, import_tvm
    from sparsec.backends.tvm.quantized import pack_quantized, quantized_linear_kernel
    from sparsec.passes.quantize import quantize_weight

    tvm = import_tvm()
    g = torch.Generator().manual_seed(0)
    q, s, o = quantize_weight(torch.randn(n, k, generator=g), bits, group, getattr(torch, scale_dtype),
                              symmetric=not offsets)
    x, thr = bench_inputs(k, kind, 1, g)
    args = [tvm.runtime.tensor(t.numpy()) for t in (x, *pack_quantized(q, s, bits, offset=o), torch.tensor([thr]),
                                                    torch.zeros(n))] + [tvm.runtime.empty((1, n), "float32")]
    calls = {}
    for rows in (None, *QUANTIZED_ROWS_PER_PASS["group" if group else "channel"]):
        func = quantized_linear_kernel(k, n, bits, group, sparse=kind != "dense", threshold=kind == "threshold",
                                       rows_per_pass=rows, scale_dtype=scale_dtype, offsets=offsets)
        f = tvm.compile(func.with_attr("global_symbol", "main"), cpu_target())["main"]
        calls[rows] = (lambda f: lambda: f(*args))(f)
    gemv = _fastest(calls, seconds, before=_evict_caches())
    best = min((r for r in calls if r is not None), key=lambda r: gemv[r])
    return {"rows_per_pass": best, "gemv_us": round(gemv[best] * 1e6, 1),
            "default_gemv_us": round(gemv[None] * 1e6, 1)}


class OtherLoad:
    """Measures, from its creation to :meth:`cores`, how many cores other processes kept busy on average (Linux's
    ``/proc/stat`` less this process's own CPU time; 0 where there is no ``/proc/stat``)."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return busy, time.process_time(), time.perf_counter()

    def cores(self) -> float:
        end = self._now()
        if self.start is None or end is None:
            return 0.0
        (busy0, own0, t0), (busy1, own1, t1) = self.start, end
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


class Scheduler:
    """Chooses the schedule of each kernel of one build: from the database, else measured for about ``seconds``
    (per kernel; 0: no measuring), else the default. ``chosen``: kernel name -> schedule and where it came from."""

    def __init__(self, seconds: float, threads: int):
        from sparsec.backends.tvm.env import host_cpu

        self.seconds, self.threads = seconds, threads
        self.db = Database()
        self.cpu = host_cpu()
        self.chosen: dict = {}
        self.max_load = max_other_load(threads) if seconds > 0 else 0.0
        self.busy = False  # whether a kernel's timings were disturbed (warned once)

    def _choose(self, name: str, key: str, measure, default: dict) -> dict:
        """Kernel ``name``'s schedule: the database's entry ``key``, else ``measure()``'s (recorded there) when
        tuning and the machine was not busy meanwhile, else ``default``; remembered in :attr:`chosen` with its
        source."""
        if name not in self.chosen:
            schedule, source = self.db.get(key), "database"
            if schedule is None and self.seconds > 0:
                with progress.task(f"compile: tune {name}"):
                    load = OtherLoad()
                    entry = measure()
                    others = load.cores()
                if others <= self.max_load:
                    self.db.put(key, entry)
                    self.db.save()
                    schedule, source = self.db.get(key), "tuned"
                elif not self.busy:
                    self.busy = True
                    progress.warn(f"not recording the schedules timed while other processes kept {others:.1f} cores"
                                  f" busy (from {name} on; at most {self.max_load:g} leave timings"
                                  " true): those kernels take the default schedule; compile again on an idle"
                                  " machine to tune them")
            if schedule is None:
                schedule, source = dict(default), "default"
            self.chosen[name] = {**schedule, "source": source}
        return self.chosen[name]

    def __call__(self, k: int, n: int, dtype: str, kind: str) -> dict:
        """The keyword arguments of ``linear_kernel`` for this kernel (see :func:`kernel_args`)."""
        from sparsec.backends.tvm.kernels import kernel_name

        chosen = self._choose(kernel_name(kind, k, n, dtype), entry_key(self.cpu, self.threads, k, n, dtype, kind),
                              lambda: tune(k, n, dtype, kind, self.threads, self.seconds),
                              default_schedule(k, n, self.threads))
        return kernel_args(k, n, chosen, self.threads)

    def quantized(self, k: int, n: int, bits: int, group: int, scale_dtype: str, offsets: bool, dtype: str,
                  kind: str) -> dict:
        """``{"rows_per_pass": R}`` of this quantized kernel (None: the kernel's default), chosen as a float kernel's
        schedule is."""
        from sparsec.backends.tvm.quantized import format_name, quantized_kernel_name

        fmt = f"{format_name(bits, group, scale_dtype, offsets)}_{dtype}"
        chosen = self._choose(quantized_kernel_name(kind, k, n, bits, group, dtype, scale_dtype, offsets),
                              entry_key(self.cpu, self.threads, k, n, fmt, kind),
                              lambda: tune_quantized(k, n, bits, group, scale_dtype, offsets, kind, self.seconds),
                              {"rows_per_pass": None, "tiles_per_thread": None, "group": None})
        return {"rows_per_pass": chosen["rows_per_pass"]}
