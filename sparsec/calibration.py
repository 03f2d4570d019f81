"""Calibration: streaming |x| statistics with bounded memory, and the data that drives them.

**The contract** is ``forward_loop(model)``: a callable that runs calibration data through ``model`` (the
llm-compressor / modelopt convention). A calibrating pass instruments its graph, calls ``forward_loop`` (possibly more
than once), and reads the statistics; it never sees the data itself. :func:`make_forward_loop` builds such a loop from
token ids, a text file, or the built-in Wikipedia text; the CLI's ``--calib-data`` goes through it.

**The sketch** is :class:`AbsHistogram`, a fixed-size histogram of ``|x|`` whose bins are read off the float32 bit
pattern: the exponent and the top ``mantissa_bits`` (m) bits of the mantissa. Every octave ``[2^e, 2^(e+1))`` is cut
into ``2^m`` equal bins, so a bin's width is at most ``2^-m`` times its lower edge, over the range
``[2^-40, 2^40)`` (values below go to bin 0 together with the zeros; values above, inf and NaN to the last bin).
Binning is exact (integer arithmetic on the bits, no logarithm), works for any dtype (converted to float32 first,
exact for bf16/fp16) and merges by adding counts (so distributed ranks all-reduce it with one ``SUM``).
Memory: ``80 * 2^m`` int64 counters per tensor (160 KiB for the default m = 8), whatever the amount of data.

**Error bound.** Let ``Q = torch.quantile(|x|, p)`` on the same data (linear interpolation between the order
statistics ``x_(lo) <= Q <= x_(hi)``, ``lo = floor(p (N-1))``, ``hi = ceil(p (N-1))``). :meth:`AbsHistogram.quantile`
returns a value in the bin holding ``x_(lo)``, hence::

    |quantile(p) - Q|  <=  2^-m * Q  +  2^-39  +  (x_(hi) - x_(lo))

(relative error 2^-m = 0.39 % for m = 8; the last term is the gap between two neighbouring order statistics, which
vanishes for large samples of a continuous distribution). In terms of ranks, the fraction of values ``<= quantile(p)``
differs from ``p`` by at most the mass of that one bin. ``tests/test_calibration.py`` checks the bound against
``torch.quantile``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable

import torch

from sparsec import progress
from sparsec.errors import SparsecError, UsageError

_LOW_EXP, _HIGH_EXP = -40, 40  # the histogram's range is [2^-40, 2^40)


class AbsHistogram:
    """Streaming histogram of |x| with relative bin width <= 2^-mantissa_bits (see the module docstring)."""

    def __init__(self, mantissa_bits: int = 8, device: Any = "cpu"):
        if not 0 <= mantissa_bits <= 12:
            raise ValueError("mantissa_bits must be in 0..12")
        self.m = mantissa_bits
        self.shift = 23 - mantissa_bits
        self.base = (127 + _LOW_EXP) << mantissa_bits
        self.nbins = (_HIGH_EXP - _LOW_EXP) << mantissa_bits
        self.counts = torch.zeros(self.nbins, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ collecting
    def update(self, x: torch.Tensor) -> None:
        """Add the magnitudes of every element of ``x`` (any float dtype, any shape, any device)."""
        v = x.detach().reshape(-1).abs().to(torch.float32)
        if v.numel() == 0:
            return
        if self.counts.device != v.device:
            self.counts = self.counts.to(v.device)
        idx = (v.view(torch.int32) >> self.shift) - self.base  # abs() cleared the sign bit: bits are monotone
        idx = idx.clamp_(0, self.nbins - 1)
        self.counts += torch.bincount(idx, minlength=self.nbins)

    def merge(self, other: "AbsHistogram") -> None:
        if other.m != self.m:
            raise ValueError("cannot merge histograms of different resolution")
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of the default process group (no-op when not distributed)."""
        all_reduce_sum(self.counts)

    def reset(self) -> None:
        self.counts.zero_()

    # ------------------------------------------------------------------ reading
    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> torch.Tensor:
        """Lower edges of the bins and the upper edge of the last one (float64, nbins + 1 values; bin 0 starts at 0)."""
        return _edges(self.m)

    def quantile(self, p: float) -> float:
        """Estimate ``torch.quantile(|x|, p)`` over everything seen so far (bound in the module docstring)."""
        return float(self.quantiles([p])[0])

    def quantiles(self, ps: Iterable[float]) -> list[float]:
        ps = list(ps)
        counts = self.counts.to("cpu", torch.float64)
        n = float(counts.sum())
        if n == 0:
            raise SparsecError("no calibration data reached this tensor: the forward_loop ran no batch through it")
        cum = torch.cumsum(counts, 0)
        edges = self.edges()
        out = []
        for p in ps:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"quantile level {p} outside [0, 1]")
            lo_rank = int(p * (n - 1))  # 0-based index of x_(lo)
            b = int(torch.searchsorted(cum, torch.tensor(lo_rank, dtype=torch.float64), right=True))
            b = min(b, self.nbins - 1)
            before = float(cum[b - 1]) if b > 0 else 0.0
            frac = (p * (n - 1) - before + 0.5) / float(counts[b])  # interpolate by rank inside the bin
            frac = min(max(frac, 0.0), 1.0)
            lo, hi = float(edges[b]), float(edges[b + 1])
            out.append(lo + frac * (hi - lo) if 0 < b < self.nbins - 1 else lo)  # bin 0 (zeros and tiny): 0
        return out

    def fraction_at_most(self, t: float) -> float:
        """Approximate fraction of magnitudes ``<= t`` (exact at bin edges)."""
        counts = self.counts.to("cpu", torch.float64)
        n = float(counts.sum())
        edges = self.edges()
        b = int(torch.searchsorted(edges, torch.tensor(t, dtype=torch.float64), right=True)) - 1
        if b < 0:
            return 0.0
        if b >= self.nbins:
            return 1.0
        inside = (t - float(edges[b])) / max(float(edges[b + 1] - edges[b]), 1e-300)
        return (float(counts[:b].sum()) + min(max(inside, 0.0), 1.0) * float(counts[b])) / n


@functools.lru_cache(maxsize=None)
def _edges(m: int) -> torch.Tensor:
    shift, base, nbins = 23 - m, (127 + _LOW_EXP) << m, (_HIGH_EXP - _LOW_EXP) << m
    bits = ((torch.arange(nbins + 1, dtype=torch.int64) + base) << shift).to(torch.int32)
    e = bits.view(torch.float32).to(torch.float64)
    e[0] = 0.0
    return e


# ---------------------------------------------------------------------------------------------- data


def default_text() -> str:
    """The built-in calibration text: Wikipedia articles [60:] from gensim's test data (MODELS.md §3.1).

    Articles [:60] are left for evaluation (perplexity, held-out sparsity)."""
    from sparsec.data import wiki_articles

    return "\n\n".join(text for _, text in wiki_articles()[60:])


def heldout_text() -> str:
    """Held-out text for measuring a calibrated model: Wikipedia articles [:60] (never used for calibration)."""
    from sparsec.data import wiki_articles

    return "\n\n".join(text for _, text in wiki_articles()[:60])


def _tokenizer(tokenizer_dir: str | None, what: str):
    if tokenizer_dir is None:
        raise UsageError(f"{what} needs the model's tokenizer and this model has none; give token ids instead:"
                         " --calib-data FILE.pt or FILE.npy (an integer tensor)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def tokenize_windows(text: str, tokenizer, seq_len: int, samples: int) -> torch.Tensor:
    """Up to ``samples`` windows of ``seq_len`` tokens from ``text``: BOS (or CLS) + the next tokens (+ SEP)."""
    from transformers.utils import logging as hf_logging

    head = [i for i in (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,)
            if i is not None]
    tail = [tokenizer.sep_token_id] if tokenizer.bos_token_id is None and tokenizer.sep_token_id is not None and head \
        else []
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise UsageError(f"--seq-len {seq_len} is too short for the special tokens of this tokenizer")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "longer than the maximum sequence length" warning: we cut windows below
    try:
        chars = 16 * body * samples  # tokenise only as much text as the windows need (doubling until enough)
        while True:
            ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            if len(ids) >= (samples + 1) * body or chars >= len(text):
                break
            chars *= 2
    finally:
        hf_logging.set_verbosity(verbosity)
    rows = [head + ids[i * body:(i + 1) * body] + tail for i in range(min(samples, len(ids) // body))]
    if not rows:
        raise UsageError(f"the calibration text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len};"
                         " give more text or a smaller --seq-len")
    return torch.tensor(rows, dtype=torch.int64)


def load_token_file(path: str) -> torch.Tensor:
    """A ``.pt`` (loaded weights-only) or ``.npy`` (no pickles) tensor from ``path``."""
    if not os.path.isfile(path):
        raise UsageError(f"calibration file '{path}' does not exist")
    if os.path.getsize(path) == 0:
        raise UsageError(f"calibration file '{path}' is empty")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"calibration file '{path}' cannot be read as a tensor ({first[:200]}); --calib-data takes"
                         " a .txt file, or a .pt/.npy tensor of token ids") from None
    if not isinstance(data, torch.Tensor):
        raise UsageError(f"calibration file '{path}' holds a {type(data).__name__}, not a tensor")
    return data


def token_batches(data: torch.Tensor, *, seq_len: int, samples: int, vocab_size: int | None,
                  source: str = "calibration data") -> torch.Tensor:
    """Validate token ids and shape them to at most ``samples`` rows: a 1-D stream is cut into ``seq_len`` windows,
    a 2-D (N, L) tensor is taken row by row."""
    if data.numel() == 0:
        raise UsageError(f"{source} is empty")
    if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
        raise UsageError(f"{source} has dtype {str(data.dtype).removeprefix('torch.')}; token ids must be integers")
    if data.dim() not in (1, 2):
        raise UsageError(f"{source} has rank {data.dim()} (shape {tuple(data.shape)}); token ids are a 1-D stream or"
                         " a 2-D (samples, seq_len) tensor")
    data = data.to(torch.int64)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or vocab_size is not None and hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UsageError(f"{source} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    if data.dim() == 1:
        n = data.numel() // seq_len
        if n == 0:
            raise UsageError(f"{source} has {data.numel()} tokens, fewer than one window of --seq-len {seq_len}")
        data = data[: n * seq_len].reshape(n, seq_len)
    return data[:samples]


def _accepted_inputs(model) -> set[str] | None:
    import inspect

    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _positional_only(model) -> bool:
    """Does ``model`` (a program's module) take its inputs by position only, as captured from a tuple example?"""
    spec = getattr(model, "_in_spec", None)  # the pytree spec of (args, kwargs) of torch.export's module()
    if spec is None or spec.num_children != 2:
        return False
    args, kwargs = spec.children_specs
    return args.num_children > 0 and kwargs.num_children == 0


def _device(model) -> torch.device:
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.device for p in params), torch.device("cpu"))


def token_forward_loop(ids: torch.Tensor, *, batch_size: int = 4, desc: str = "calibration") -> Callable:
    """``forward_loop(model)`` running ``ids`` (N, L) through ``model`` in batches of ``batch_size``, as
    ``input_ids`` (with an all-ones ``attention_mask`` when the model takes one), or as the first input of a program
    captured with positional inputs."""

    def forward_loop(model) -> None:
        accepted = _accepted_inputs(model)
        positional = _positional_only(model)
        device = _device(model)
        batches = range(0, ids.shape[0], batch_size)
        with torch.no_grad():
            for i in progress.iterate(batches, desc, merge=True):
                x = ids[i:i + batch_size].to(device)
                if positional:
                    model(x)
                    continue
                kwargs = {"input_ids": x}
                if accepted is None or "attention_mask" in accepted:
                    kwargs["attention_mask"] = torch.ones_like(x)
                model(**kwargs)

    forward_loop.samples, forward_loop.tokens = int(ids.shape[0]), int(ids.numel())
    return forward_loop


def tensor_forward_loop(data: torch.Tensor, *, batch_size: int = 4, desc: str = "calibration") -> Callable:
    """``forward_loop(model)`` feeding the rows of a float tensor as the model's first input, in batches."""

    def forward_loop(model) -> None:
        device = _device(model)
        batches = range(0, data.shape[0], batch_size)
        with torch.no_grad():
            for i in progress.iterate(batches, desc, merge=True):
                model(data[i:i + batch_size].to(device))

    forward_loop.samples = int(data.shape[0])
    return forward_loop


def make_forward_loop(calib_data: str | None, *, tokenizer_dir: str | None = None, vocab_size: int | None = None,
                      example_input: torch.Tensor | None = None, samples: int = 16, seq_len: int = 512,
                      batch_size: int = 4) -> Callable:
    """Build ``forward_loop`` from the CLI's ``--calib-data``.

    ``calib_data``: ``None`` (the built-in Wikipedia text, articles [60:], needs the model's tokenizer), a ``.txt``
    file (tokenised with the model's tokenizer, cut into ``samples`` windows of ``seq_len`` tokens), or a ``.pt`` /
    ``.npy`` tensor: integer token ids (1-D stream or 2-D rows), or float inputs (rows fed as the model's first input;
    their trailing shape must match ``example_input``).
    """
    for name, value in (("--calib-samples", samples), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if calib_data is None:
        tok = _tokenizer(tokenizer_dir, "the built-in calibration text (Wikipedia from gensim)")
        return token_forward_loop(tokenize_windows(default_text(), tok, seq_len, samples), batch_size=batch_size)
    ext = os.path.splitext(calib_data)[1].lower()
    if ext in (".txt", ".text", ".md"):
        from sparsec.data import read_text_file

        text = read_text_file(calib_data, "calibration file")
        tok = _tokenizer(tokenizer_dir, f"--calib-data {calib_data} (text)")
        return token_forward_loop(tokenize_windows(text, tok, seq_len, samples), batch_size=batch_size)
    if ext not in (".pt", ".pth", ".npy"):
        raise UsageError(f"calibration file '{calib_data}': unknown type '{ext or '(none)'}'; --calib-data takes a"
                         " .txt file, or a .pt/.npy tensor of token ids")
    data = load_token_file(calib_data)
    if data.is_floating_point():
        if example_input is None or data.dim() != example_input.dim() or data.shape[1:] != example_input.shape[1:]:
            want = "" if example_input is None else f" (N, {', '.join(map(str, example_input.shape[1:]))})"
            raise UsageError(f"calibration file '{calib_data}' holds float data of shape {tuple(data.shape)}; float"
                             f" inputs must have the shape of the model's first input{want}, token ids must be"
                             " integers")
        return tensor_forward_loop(data[:samples], batch_size=batch_size)
    ids = token_batches(data, seq_len=seq_len, samples=samples, vocab_size=vocab_size,
                        source=f"calibration file '{calib_data}'")
    return token_forward_loop(ids, batch_size=batch_size)


# ------------------------------------------------------------------------------- thresholds calibrated in graph order


class ThresholdSite:
    """A tensor of the graph whose consumers each get ``sparsec::threshold`` with its own threshold and target.

    Modes (set by :class:`ThresholdSites`): ``collect`` streams |x| into ``hist``; ``calibrate`` does that and then,
    within the same forward and before any consumer runs, sets every threshold to the quantile of everything seen so
    far at its target, and counts the zeros each threshold makes. So the inputs of later sites are already thresholded:
    calibration runs in graph order on the sparsified model in one pass over the data.
    """

    def __init__(self, node, consumers: list, module: list[str], bits: int):
        self.node, self.consumers, self.modules = node, consumers, module
        self.hist = AbsHistogram(bits)
        self.thresholds: list[torch.Tensor] = []  # one 0-d buffer per consumer
        self.targets: list[float] = [0.0] * len(consumers)
        self.mode = "off"
        self.zeros = [0] * len(consumers)
        self.numel = 0

    def observe(self, x: torch.Tensor) -> None:
        if self.mode == "off":
            return
        self.hist.update(x)
        if self.mode != "calibrate":
            return
        self.set_thresholds()
        a = x.detach().abs()
        self.numel += a.numel()
        for j, t in enumerate(self.thresholds):
            self.zeros[j] += int((a <= t).sum())

    def set_thresholds(self) -> None:
        """Thresholds from the histogram: the |x| quantile at each target (0 for target 0: only zeros are zeroed)."""
        values = self.hist.quantiles(self.targets)
        for t, p, v in zip(self.thresholds, self.targets, values):
            t.fill_(v if p > 0 else 0.0)

    def measured(self) -> list[float]:
        return [z / self.numel if self.numel else 0.0 for z in self.zeros]


class _Observer(torch.nn.Module):
    """Identity that streams its input into a :class:`ThresholdSite` (present only while calibrating)."""

    def __init__(self, site: ThresholdSite):
        super().__init__()
        self.site = site

    def forward(self, x):
        self.site.observe(x)
        return x


class ThresholdSites:
    """Insert ``sparsec::threshold`` between graph tensors and their consumers, with observers for calibration.

    ``groups``: ``(tensor node, [(consumer node, module path), ...])`` in graph order. Each consumer gets a 0-d
    threshold buffer (in an ``nn.Module`` container named ``prefix`` on ``gm``), initialised to -1 (nothing zeroed),
    and reads ``threshold(x, t)`` instead of ``x``. :meth:`calibrate` fills the buffers; :meth:`remove_observers`
    leaves only the thresholds.
    """

    def __init__(self, gm, groups: list, prefix: str, bits: int):
        import re

        from sparsec.ops import THRESHOLD

        self.gm = gm
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        holder_name, i = prefix, 1
        while hasattr(gm, holder_name):
            holder_name, i = f"{prefix}_{i}", i + 1
        self.holder = torch.nn.Module()
        gm.add_module(holder_name, self.holder)
        graph, used = gm.graph, set()
        self.sites: list[ThresholdSite] = []
        self._observers = []
        for k, (x, consumers) in enumerate(groups):
            site = ThresholdSite(x, [c for c, _ in consumers], [m for _, m in consumers], bits)
            obs_name = f"{holder_name}_observer{k}"
            gm.add_module(obs_name, _Observer(site))
            with graph.inserting_after(x):
                obs = graph.call_module(obs_name, (x,))
            obs.meta.update({key: x.meta[key] for key in ("val", "nn_module_stack") if key in x.meta})
            self._observers.append((obs, obs_name))
            for consumer, module in consumers:
                base = re.sub(r"\W", "_", module) or "input"
                buf, j = base, 1
                while buf in used:
                    buf, j = f"{base}_{j}", j + 1
                used.add(buf)
                self.holder.register_buffer(buf, torch.tensor(-1.0, device=device))
                site.thresholds.append(getattr(self.holder, buf))
                with graph.inserting_before(consumer):
                    t = graph.get_attr(f"{holder_name}.{buf}")
                    thr = graph.call_function(THRESHOLD, (obs, t))
                for node in (t, thr):  # the consumer's module path, so reports and later passes can target them
                    node.meta["nn_module_stack"] = consumer.meta.get("nn_module_stack")
                thr.meta.update({key: x.meta[key] for key in ("val", "stack_trace") if key in x.meta})
                consumer.replace_input_with(x, thr)
            self.sites.append(site)
        graph.lint()
        gm.recompile()

    def set_mode(self, mode: str) -> None:
        for s in self.sites:
            s.mode = mode

    def calibrate(self, forward_loop: Callable, targets: list[list[float]], rounds: int = 1) -> None:
        """Set every threshold to its target (``targets[i]``: one per consumer of site i) in graph order.

        Each round resets the histograms and runs ``forward_loop`` once; the last round's zero counts are the
        measured sparsity on the calibration data. Distributed: histograms and counts are all-reduced, and the final
        thresholds are the quantiles of the merged histograms, identical on every rank."""
        for s, t in zip(self.sites, targets):
            s.targets = list(t)
        for _ in range(rounds):
            for s in self.sites:
                s.hist.reset()
                s.zeros, s.numel = [0] * len(s.thresholds), 0
            self.set_mode("calibrate")
            try:
                with torch.no_grad():
                    forward_loop(self.gm)
            finally:
                self.set_mode("off")
            for s in self.sites:
                s.hist.all_reduce()
                _all_reduce_counts(s)
                if s.numel == 0:
                    raise SparsecError(f"calibration data never reached the input of {s.modules[0]}: the"
                                       " forward_loop ran no batch through the model")
                s.set_thresholds()

    def remove_observers(self) -> None:
        graph = self.gm.graph
        for obs, name in self._observers:
            obs.replace_all_uses_with(obs.args[0])
            graph.erase_node(obs)
            self.gm.delete_submodule(name)
        self._observers = []
        graph.lint()
        self.gm.recompile()


def all_reduce_sum(t: torch.Tensor) -> int:
    """Sum ``t`` in place over the ranks of the default process group; returns the world size (1, and ``t``
    untouched, when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dist.get_world_size()


def _all_reduce_counts(site: ThresholdSite) -> None:
    counts = torch.tensor([site.numel, *site.zeros], dtype=torch.int64)
    if all_reduce_sum(counts) > 1:
        site.numel, site.zeros = int(counts[0]), [int(c) for c in counts[1:]]
