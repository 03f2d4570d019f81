"""Dense CPU peers for text generation: Hugging Face ``generate`` and llama.cpp (F32, Q8_0, Q4_0, Q4_K_M).

    .venv/bin/python benchmarks/peers.py --models tinyllama,gemma \\
        --peers hf,llamacpp-f32,llamacpp-q8_0,llamacpp-q4_0,llamacpp-q4_k_m --contexts 128,1024 \\
        --new-tokens 128 --reps 3 --json OUT.json --markdown OUT.md [--llama-layers 2]

Batch 1, 2 threads, greedy decoding of a fixed number of new tokens (EOS ignored), fp32 weights unless the peer
names a GGUF type. Each peer runs in its own subprocess (thread pools that spin slow whatever runs beside them), one
at a time. Per row: prefill ms (the prompt of ``context`` tokens, up to the first new token), decode ms/token (median
over the decode steps of a run; the median of ``reps`` runs, after a short warm-up run), tokens/s = 1000 / decode ms,
peak RSS MiB of the child (``ru_maxrss``; llama.cpp mmaps its GGUF, so the weight pages it touched count).

- ``hf``: ``model.generate`` (torch eager, default attention implementation, an explicit ``DynamicCache``); a
  ``LogitsProcessor`` timestamps every step: prefill = generate start to the first call, decode steps = the gaps
  between calls (one forward of one token plus generate's own per-step work).
- ``llamacpp-TYPE``: ``llama-cpp-python`` 0.3.36 built from source into a cached venv (``$SPARSEC_CACHE`` or
  ~/.cache/sparsec ``/peers-venv``, made on first use, ~17 min on 2 cores). Wall clock around ``llm.eval(prompt)``
  and each ``llm.eval([token])`` with the argmax of the last logits; llama.cpp's ``llama_perf_context`` decode
  ms/token is kept as ``perf_decode_ms``. GGUFs are written from the same HF fp32 weights the ``hf`` row uses: F32
  with the ``convert_hf_to_gguf.py`` vendored in the llama-cpp-python sdist, the others with
  ``llama_model_quantize`` from the F32 file; cached in ``<model dir>-gguf/`` keyed by the weights' sha256.

Models: ``tinyllama`` = a Llama with TinyLlama-1.1B's shape (2048 / 5632, 22 layers, 32 heads, 4 KV heads, 32000
vocabulary) and random weights (seed 0), prompt = random token ids (seed 0); ``gemma`` = the real Gemma 3 270M
(``sparsec.models.gemma3_270m_dir``), prompt = tokenized held-out Wikipedia text; or any HF directory.
``PEERS`` maps a peer name to ``fn(model_dir, prompt_ids, new_tokens, reps) -> dict``; add rows there (e.g. ONNX
Runtime). ``cpu_description()`` and ``run_peer()`` are the API for scripts that add their own rows to the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve()
CACHE = pathlib.Path(os.environ.get("SPARSEC_CACHE", "~/.cache/sparsec")).expanduser()
PEERS_VENV = CACHE / "peers-venv"
LLAMA_CPP_PYTHON = "0.3.36"
THREADS = 2
_MARK = "PEERS-RESULT "
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
GGUF_FTYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}  # llama_ftype: LLAMA_FTYPE_ALL_F32, MOSTLY_...


# ------------------------------------------------------------------------------------------------ subprocesses
def child_env() -> dict:
    """The environment of a peer's process: THREADS OpenMP threads, no hub access, no tokenizer threads."""
    return dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _child(python: str | os.PathLike, func: str, quiet: bool = False, script: os.PathLike = HERE, **kwargs):
    """Run ``func(**kwargs)`` of ``script`` (default: this file) in a fresh ``python`` process; returns its JSON
    result. ``quiet``: keep the child's stderr (logs, progress bars) unless it fails."""
    proc = subprocess.run([str(python), str(script), "--child", func, json.dumps(kwargs)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if quiet else None, text=True, env=child_env())
    results = [line[len(_MARK):] for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode or not results:
        raise RuntimeError(f"{func} failed (exit {proc.returncode}): {proc.stdout[-2000:]}{proc.stderr or ''}"[-4000:])
    return json.loads(results[-1])


def _peak_rss_mib() -> float:
    """This process's peak resident set, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peers_python() -> pathlib.Path:
    """The cached venv's python with llama-cpp-python built from source (made on first use, ~17 min)."""
    python = PEERS_VENV / "bin" / "python"
    if python.exists() and not subprocess.run([python, "-c", "import llama_cpp, gguf"], capture_output=True).returncode:
        return python
    print(f"building llama-cpp-python=={LLAMA_CPP_PYTHON} into {PEERS_VENV} (~17 min on 2 cores)", file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", PEERS_VENV], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2", CMAKE_ARGS=(
        "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
        " -DLLAMA_BUILD_SERVER=OFF"))
    subprocess.run([python, "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "numpy", "gguf==0.19.0"],
                   check=True, env=env)
    return python


def converter_dir() -> pathlib.Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py/), cached."""
    root = CACHE / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    target = root / "vendor" / "llama.cpp"
    if not (target / "convert_hf_to_gguf.py").exists():
        sdist = CACHE / "sdist"
        subprocess.run([peers_python(), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", sdist,
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        members = [f"{root.name}/vendor/llama.cpp/{m}" for m in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        subprocess.run(["tar", "xzf", sdist / f"{root.name}.tar.gz", "-C", sdist, *members], check=True)
    return target


# ------------------------------------------------------------------------------------------------ models
def model_dir(model: str, llama_layers: int = 22) -> pathlib.Path:
    """'tinyllama' (random weights, TinyLlama-1.1B's shape, ``llama_layers`` layers), 'gemma', or an HF directory."""
    if model == "tinyllama":
        path = CACHE / "bench-models" / ("tinyllama-shape" + ("" if llama_layers == 22 else f"-L{llama_layers}"))
        if not (path / "config.json").exists():
            _child(sys.executable, "_make_llama", True, path=str(path), layers=llama_layers)
        return path
    if model == "gemma":
        from sparsec.models import gemma3_270m_dir

        return gemma3_270m_dir()
    return pathlib.Path(model)


def _make_llama(path: str, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINYLLAMA, num_hidden_layers=layers))).float()
    tmp = pathlib.Path(path + ".tmp")
    model.save_pretrained(tmp)
    os.rename(tmp, path)
    return {}


@functools.lru_cache(maxsize=None)
def prompt_ids(path: pathlib.Path, context: int) -> tuple[int, ...]:
    """``context`` token ids: tokenized held-out Wikipedia text if the model has a tokenizer, else random (seed 0)."""
    if (path / "tokenizer.json").exists():
        return tuple(_child(sys.executable, "_tokenize", True, path=str(path), context=context))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return tuple(rng.randrange(3, vocab) for _ in range(context))


def _tokenize(path: str, context: int) -> list[int]:
    from transformers import AutoTokenizer

    from sparsec.calibration import heldout_text

    ids = AutoTokenizer.from_pretrained(path)(heldout_text()[: 12 * context])["input_ids"]
    assert len(ids) >= context, (len(ids), context)
    return ids[:context]


def _weights_sha256(path: pathlib.Path) -> str:
    """sha256 of config.json and the *.safetensors files, memoized against their sizes and mtimes."""
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    stat = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = path.parent / f"{path.name}-gguf" / "weights.json"
    if memo.exists() and json.loads(memo.read_text())["stat"] == stat:
        return json.loads(memo.read_text())["sha256"]
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"stat": stat, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def gguf_file(path: pathlib.Path, gguf_type: str) -> pathlib.Path:
    """The GGUF of the HF fp32 weights in ``path`` (F32 converted, other types quantized from it), cached."""
    out = path.parent / f"{path.name}-gguf" / f"{_weights_sha256(path)[:16]}-{gguf_type}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        if gguf_type == "F32":
            _child(sys.executable, "_convert", True, path=str(path), out=str(tmp), converter=str(converter_dir()))
        else:
            _child(peers_python(), "_quantize", True, src=str(gguf_file(path, "F32")), out=str(tmp),
                   ftype=GGUF_FTYPES[gguf_type])
        os.rename(tmp, out)
    return out


def _placeholder_vocab(self) -> None:
    """A Llama-2-layout SentencePiece vocabulary for a model without a tokenizer (prompts are given as ids)."""
    import gguf

    n, T = self.hparams["vocab_size"], gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"\u2581t{i}" for i in range(n - len(tokens))]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(n - 259)])
    w.add_token_types([T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (n - 259))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def _convert(path: str, out: str, converter: str) -> dict:
    sys.path[:0] = [converter]
    import convert_hf_to_gguf  # vendored by the llama-cpp-python sdist

    if not (pathlib.Path(path) / "tokenizer.json").exists():
        from conversion.llama import LlamaModel

        LlamaModel.set_vocab = _placeholder_vocab
    sys.argv = ["convert_hf_to_gguf.py", path, "--outfile", out, "--outtype", "f32"]
    convert_hf_to_gguf.main()
    return {}


def _quantize(src: str, out: str, ftype: int) -> dict:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, THREADS
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {out} (ftype {ftype}) failed")
    return {}


# ------------------------------------------------------------------------------------------------ peers
def _summary(runs: list[tuple[float, list[float], list[int]]]) -> dict:
    """runs of (prefill ms, decode step ms, tokens) -> medians over runs of prefill and of each run's median step."""
    return {"prefill_ms": statistics.median(r[0] for r in runs),
            "decode_ms": statistics.median(statistics.median(r[1]) for r in runs),
            "prefill_ms_runs": [r[0] for r in runs], "decode_ms_runs": [statistics.median(r[1]) for r in runs],
            "tokens": runs[0][2], "peak_rss_mib": _peak_rss_mib()}


def _hf(path: str, prompt: list[int], new_tokens: int, reps: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # a fixed number of new tokens
    ids = torch.tensor([prompt])

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    def run(n: int):
        stamps = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 past_key_values=DynamicCache(config=model.config),
                                 logits_processor=LogitsProcessorList([stamps]))
        t, tokens = stamps.t, out[0, len(prompt):].tolist()
        assert len(t) == len(tokens) == n, (len(t), len(tokens), n)
        return (t[0] - start) * 1e3, [(b - a) * 1e3 for a, b in zip(t, t[1:])], tokens

    run(4)  # warm-up
    return dict(_summary([run(new_tokens) for _ in range(reps)]), weights="fp32",
                runtime=f"transformers {transformers.__version__}, torch {torch.__version__}"
                        f" ({model.config._attn_implementation} attention)")


def llamacpp_model(gguf: str, n_ctx: int):
    """``(llm, argmax)``: the GGUF loaded by llama-cpp-python for ``n_ctx`` tokens on THREADS threads, and a
    callable giving the argmax of its last position's logits."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=n_ctx, n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    return llm, argmax


def _llamacpp(gguf: str, prompt: list[int], new_tokens: int, reps: int) -> dict:
    import llama_cpp

    llm, argmax = llamacpp_model(gguf, len(prompt) + new_tokens)

    def run(n: int):
        llm.reset()  # the next eval drops the whole KV cache
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llm.eval(prompt)
        tokens, steps = [argmax()], []
        prefill = (time.perf_counter() - start) * 1e3
        for _ in range(n - 1):
            start = time.perf_counter()
            llm.eval([tokens[-1]])
            tokens.append(argmax())
            steps.append((time.perf_counter() - start) * 1e3)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        run.perf.append(perf.t_eval_ms / max(perf.n_eval, 1))
        return prefill, steps, tokens

    run.perf = []
    run(4)  # warm-up
    result = _summary([run(new_tokens) for _ in range(reps)])
    return dict(result, weights=pathlib.Path(gguf).stem.split("-", 1)[1], runtime=f"llama-cpp-python"
                f" {llama_cpp.__version__}", perf_decode_ms=statistics.median(run.perf[1:]))


def _llamacpp_perplexity(gguf: str, ids: list[list[int]]) -> dict:
    """llama.cpp's perplexity of ``gguf`` over the rows of ``ids``: every next token after a row's first, each row
    evaluated alone from an empty cache (as :func:`sparsec.evaluate.perplexity` does in torch)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=max(map(len, ids)),
                          n_batch=max(map(len, ids)), logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for row in ids:
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:len(row) - 1], dtype=np.float64)
        top = logits.max(1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(1))
        nll += float((log_z - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count,
            "runtime": f"llama-cpp-python {llama_cpp.__version__}"}


def llamacpp_perplexity(path: pathlib.Path, gguf_type: str, ids) -> dict:
    """llama.cpp's perplexity of the HF model in ``path`` written as ``gguf_type`` (F32, Q8_0, Q4_0, Q4_K_M; the
    quantized files made from the F32 one by llama.cpp's own quantizer) over the rows of ``ids`` (N x L)."""
    gguf = gguf_file(path, gguf_type)
    result = _child(peers_python(), "_llamacpp_perplexity", True, gguf=str(gguf), ids=[list(map(int, r)) for r in ids])
    return dict(result, file_mb=gguf.stat().st_size / 1e6)


def _hf_peer(path: pathlib.Path, prompt, new_tokens: int, reps: int) -> dict:
    return _child(sys.executable, "_hf", path=str(path), prompt=list(prompt), new_tokens=new_tokens, reps=reps)


def _llamacpp_peer(gguf_type: str, path: pathlib.Path, prompt, new_tokens: int, reps: int) -> dict:
    gguf = str(gguf_file(path, gguf_type))
    return _child(peers_python(), "_llamacpp", gguf=gguf, prompt=list(prompt), new_tokens=new_tokens, reps=reps)


PEERS = {"hf": _hf_peer, **{f"llamacpp-{t.lower()}": functools.partial(_llamacpp_peer, t) for t in GGUF_FTYPES}}


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process's finished children)."""
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def other_load(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes (not this one's children) over the next ``seconds``."""
    return _with_load(lambda: time.sleep(seconds) or {})["other_load"]


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait_s`` s until other processes use < ``threshold`` cores; returns the last load seen."""
    if max_wait_s <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait_s
    while (load := other_load()) >= threshold and time.monotonic() < deadline:
        time.sleep(3)
    return load


def _with_load(fn, *args) -> dict:
    """``fn(*args)`` (a dict) plus other_load: cores used by other processes on average while it ran."""
    before, start = _cpu_seconds(), time.perf_counter()
    result = fn(*args)
    after = _cpu_seconds()
    busy = (after[0] - before[0]) - (after[1] - before[1])
    return dict(result, other_load=max(0.0, busy) / (time.perf_counter() - start))


@contextlib.contextmanager
def machine_lock():
    """Held while a row runs: one benchmark row at a time on this machine, across processes (flock)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def model_name(model: str | os.PathLike, llama_layers: int = 22) -> str:
    """The row label: 'tinyllama' (with '-L<n>' for fewer layers), 'gemma', or the directory's name."""
    if str(model) == "tinyllama":
        return "tinyllama" + ("" if llama_layers == 22 else f"-L{llama_layers}")
    return str(model) if str(model) == "gemma" else pathlib.Path(model).name


def run_peer(peer: str, model: str | os.PathLike, context: int, new_tokens: int, reps: int = 3,
             llama_layers: int = 22, wait_quiet_s: float = 0, max_load: float = 0.25) -> dict:
    """One row: ``PEERS[peer]`` on ``model`` (name or HF directory) with a ``context``-token prompt.

    Keys: peer, model, context, new_tokens, reps, prefill_ms, decode_ms (ms/token), tokens_per_s, peak_rss_mib,
    weights, runtime, tokens (the greedy ids of the first timed run), the per-run medians, and other_load (cores
    used by other processes on average while the peer ran; the machine has ``os.cpu_count()``). Before the peer
    starts (GGUFs and prompts are made first), takes ``machine_lock()`` and waits up to ``wait_quiet_s`` s for other
    processes to use less than ``max_load`` cores.
    """
    path = model_dir(str(model), llama_layers)
    prompt = prompt_ids(path, context)
    if peer.startswith("llamacpp-"):
        gguf_file(path, peer.split("-", 1)[1].upper())
    with machine_lock():
        wait_quiet(wait_quiet_s, max_load)
        row = _with_load(PEERS[peer], path, prompt, new_tokens, reps)
    return dict(peer=peer, model=model_name(model, llama_layers), context=context, new_tokens=new_tokens, reps=reps,
                tokens_per_s=1000 / row["decode_ms"], **row)


# ------------------------------------------------------------------------------------------------ CPU, report
def _bandwidth() -> dict:
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(1 << 28)  # 1.07 GB of fp32
    x.sum()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return {"read_gb_s": x.numel() * 4 / 1e9 / statistics.median(times)}


def cpu_description(wait_quiet_s: float = 0) -> dict:
    """CPU model, L2/L3 (lscpu), read bandwidth GB/s (torch.sum over 1.07 GB fp32, 2 threads, median of 7), measured
    after waiting up to ``wait_quiet_s`` s for other processes to go quiet (their load then is kept as other_load)."""
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    isa = "AVX-512" if "avx512f" in info.get("flags", "").split() else "AVX2, no AVX-512"
    name = f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family')} model {info.get('model')}, {isa})"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    cache = {k: next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith(f"{k} cache:")), "?")
             for k in ("L2", "L3")}
    bw = None
    for i in range(5):  # short: keep the least disturbed of up to 5 tries
        with machine_lock():
            wait_quiet(wait_quiet_s if i == 0 else min(wait_quiet_s, 60))
            attempt = _with_load(_child, sys.executable, "_bandwidth")
        bw = attempt if bw is None or attempt["other_load"] < bw["other_load"] else bw
        if bw["other_load"] < 0.25:
            break
    return {"model": name, "cores": os.cpu_count(), "l2": cache["L2"], "l3": cache["L3"], **bw,
            "summary": f"{name}, {os.cpu_count()} cores, L2 {cache['L2']}, L3 {cache['L3']}; read bandwidth"
                       f" {bw['read_gb_s']:.1f} GB/s (torch.sum over 1.07 GB fp32, {THREADS} threads; other"
                       f" processes' load meanwhile {bw['other_load']:.2f} cores)"}


def markdown(cpu: dict, rows: list[dict], command: str = "") -> str:
    """A markdown report: the CPU, one table row per result, and greedy agreement of every peer with ``hf``."""
    lines = ["# Dense CPU peers: text generation, batch 1, 2 threads, greedy, fixed number of new tokens", "",
             f"CPU: {cpu['summary']}.", ""]
    if command:
        lines += [f"`{command}`", ""]
    lines += ["| model | peer | weights | context | new tokens | prefill ms | decode ms/token | tokens/s |"
              " peak RSS MiB | other load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['peer']} | {r['weights']} | {r['context']} | {r['new_tokens']} |"
                     f" {r['prefill_ms']:.0f} | {r['decode_ms']:.2f} | {r['tokens_per_s']:.1f} |"
                     f" {r['peak_rss_mib']:.0f} | {r['other_load']:.2f} |")
    if any("rounds" in r for r in rows):
        lines += ["", "Rounds (`--rounds`: every other pass over the rows reversed; the table holds each row's"
                  " medians), per round:", ""]
        lines += [f"- {r['model']} context {r['context']}, {r['peer']}: decode "
                  + " / ".join(f"{x['decode_ms']:.2f}" for x in r["rounds"]) + " ms/token, prefill "
                  + " / ".join(f"{x['prefill_ms']:.0f}" for x in r["rounds"]) + " ms" for r in rows if "rounds" in r]
    lines += ["", "Greedy tokens vs `hf` (leading tokens identical / generated):", ""]
    for r in rows:
        ref = next((h for h in rows if h["peer"] == "hf" and (h["model"], h["context"]) == (r["model"], r["context"])),
                   None)
        if ref is not None and r is not ref:
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b),
                        min(len(r["tokens"]), len(ref["tokens"])))
            lines.append(f"- {r['model']} context {r['context']}, {r['peer']}: {same} / {len(r['tokens'])}")
    lines += ["", "Timing: `hf` = `model.generate` with a LogitsProcessor timestamping each step (prefill = start of"
              " generate to the first new token's logits; a decode step = one token's forward plus generate's per-step"
              " work); llama.cpp = wall clock around `llm.eval` of the prompt and of each token, plus the argmax of"
              " the last logits. decode ms/token = median over a run's steps, median of the runs; prefill = median of"
              " the runs. Peak RSS = ru_maxrss of the peer's own process (llama.cpp's mmapped GGUF pages included)."
              " Other load ="
              " cores kept busy by other processes while the row ran (from /proc/stat less the peer's own CPU time);"
              " above ~0.2 the row's times are inflated (2 spinning threads share 2 cores with them)."]
    return "\n".join(lines) + "\n"


def add_run_arguments(p: argparse.ArgumentParser, peers: str) -> None:
    """The options shared by ``peers.py`` and ``generate.py``."""
    p.add_argument("--models", default="tinyllama,gemma")
    p.add_argument("--peers", default=peers)
    p.add_argument("--contexts", default="128,1024", help="prompt lengths, tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--long-new-tokens", type=int, default=32, help="new tokens for contexts >= 512")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over all rows, every other one in reverse order; a row reports the medians over its"
                        " rounds (this machine's memory bandwidth drifts between minutes: rows compared across a"
                        " single pass can differ by more than the goals they are held to)")
    p.add_argument("--llama-layers", type=int, default=22)
    p.add_argument("--wait-quiet", type=float, default=300,
                   help="before each row, wait up to this many seconds for other processes to use < --max-load cores")
    p.add_argument("--max-load", type=float, default=0.25, help="cores other processes may use during a row")
    p.add_argument("--retries", type=int, default=1,
                   help="passes at the end that rerun the rows other processes disturbed (>= --max-load)")
    p.add_argument("--json", help="results, rewritten after every row")
    p.add_argument("--resume", action="store_true",
                   help="keep the undisturbed rows (and CPU measurement) of --json; measure the rest")
    p.add_argument("--markdown")


def run_rows(args: argparse.Namespace, peer_names: list[str]) -> tuple[dict, list[dict]]:
    """Measure the CPU, then every (model, context, peer) row of ``args``: (cpu, rows in plan order). With --json the
    results are rewritten after every row; --resume keeps its undisturbed rows; disturbed rows are rerun at the end."""
    resume = args.resume and args.json and os.path.exists(args.json)
    old = json.loads(pathlib.Path(args.json).read_text()) if resume else {"cpu": None, "rows": []}
    cpu = old["cpu"]
    if cpu is None or cpu["other_load"] >= args.max_load:
        cpu = min([c for c in (cpu, cpu_description(args.wait_quiet)) if c], key=lambda c: c["other_load"])
    print(cpu["summary"], flush=True)
    plan = [(model, context, args.new_tokens if context < 512 else args.long_new_tokens, peer)
            for model in args.models.split(",") for context in map(int, args.contexts.split(","))
            for peer in peer_names]

    def key(model, context, new_tokens, peer):
        return model_name(model, args.llama_layers), peer, context, new_tokens

    done = {(r["model"], r["peer"], r["context"], r["new_tokens"]): r for r in old["rows"] if r["reps"] == args.reps}
    rounds: dict = {}  # key -> the rows of the later rounds

    def save():
        if args.json:
            rows = [_over_rounds([done[key(*s)], *rounds.get(key(*s), [])]) for s in plan if key(*s) in done]
            pathlib.Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))

    def run(spec):
        start = time.perf_counter()
        r = run_peer(spec[3], spec[0], spec[1], spec[2], args.reps, args.llama_layers, args.wait_quiet, args.max_load)
        print(f"{r['model']} {r['peer']} ({r['weights']}) context {r['context']}: prefill {r['prefill_ms']:.0f} ms,"
              f" decode {r['decode_ms']:.2f} ms/token ({r['tokens_per_s']:.1f} tokens/s), peak RSS"
              f" {r['peak_rss_mib']:.0f} MiB, other load {r['other_load']:.2f} cores"
              f" ({time.perf_counter() - start:.0f} s)", flush=True)
        return r

    for _ in range(1 + args.retries):  # then rerun the rows other processes disturbed, keeping the less disturbed
        for spec in plan:
            if (prev := done.get(key(*spec))) is not None and prev["other_load"] < args.max_load:
                continue
            r = run(spec)
            if prev is None or r["other_load"] < prev["other_load"]:
                done[key(*spec)] = r
            save()
    for i in range(1, args.rounds):
        for spec in plan[::-1] if i % 2 else plan:
            rounds.setdefault(key(*spec), []).append(run(spec))
            save()
    return cpu, [_over_rounds([done[key(*s)], *rounds.get(key(*s), [])]) for s in plan]


def _over_rounds(runs: list[dict]) -> dict:
    """One row from its rounds: median prefill and decode times, the largest peak RSS and other load; the rounds'
    own times kept under ``rounds``."""
    if len(runs) == 1:
        return runs[0]
    decode = statistics.median(r["decode_ms"] for r in runs)
    return {**runs[0], "prefill_ms": statistics.median(r["prefill_ms"] for r in runs), "decode_ms": decode,
            "tokens_per_s": 1000 / decode, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "other_load": max(r["other_load"] for r in runs),
            "rounds": [{k: r[k] for k in ("prefill_ms", "decode_ms", "other_load")} for r in runs]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(p, ",".join(PEERS))
    args = p.parse_args(argv)
    cpu, rows = run_rows(args, args.peers.split(","))
    report = markdown(cpu, rows, "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.markdown:
        pathlib.Path(args.markdown).write_text(report)
    print(report)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(_MARK + json.dumps(globals()[sys.argv[2]](**json.loads(sys.argv[3]))), flush=True)
    else:
        main()
