"""``sparsec eval``: the transformed model beside the dense one it came from, on the user's text.

- perplexity (causal LMs): ``exp`` of the mean next-token negative log-likelihood over ``samples`` windows of
  ``seq_len`` tokens of the text (BOS + tokens, as in calibration), for the transformed and the dense model;
- embeddings (encoders): each non-empty line of the text is one input (truncated to ``seq_len`` tokens); the
  embedding is the attention-masked mean of the last hidden state; reported: the mean cosine similarity between
  the transformed and the dense model's embeddings.
"""
from __future__ import annotations

import math
import os

import torch

from sparsec import progress
from sparsec.data import read_text_file
from sparsec.errors import SparsecError, UsageError


def _first_tensor(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def perplexity(model, ids: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """Perplexity of a causal LM over the rows of ``ids`` (N, L): every next token after the first."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in progress.iterate(range(0, ids.shape[0], batch_size), desc):
            x = ids[i:i + batch_size]
            logits = _first_tensor(model(input_ids=x, attention_mask=torch.ones_like(x))).float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def embeddings(model, tokenizer, texts: list[str], seq_len: int, batch_size: int = 16,
               desc: str = "embeddings") -> torch.Tensor:
    """Attention-masked mean of the last hidden state, one row per text."""
    out = []
    with torch.no_grad():
        for i in progress.iterate(range(0, len(texts), batch_size), desc):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                            return_tensors="pt")
            hidden = _first_tensor(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])).float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def evaluate(artifact: str, *, ppl: str | None = None, embed: str | None = None, seq_len: int = 512,
             samples: int = 16, batch_size: int = 4) -> dict:
    """Evaluate an artifact against the dense model named in its manifest (see the module docstring)."""
    from transformers import AutoTokenizer

    from sparsec.api import load_artifact
    from sparsec.calibration import tokenize_windows
    from sparsec.frontend import load_model
    from sparsec.kv_cache import FullSequence, program_layout

    if (ppl is None) == (embed is None):
        raise UsageError("give one of --ppl TEXTFILE (causal LMs: perplexity) and --embed TEXTFILE (encoders: cosine"
                         " similarity of embeddings)")
    for name, value in (("--seq-len", seq_len), ("--samples", samples), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    text = read_text_file(ppl or embed, "--ppl file" if ppl else "--embed file")
    art = load_artifact(artifact)
    source = art.manifest.get("source", {})
    if not source.get("tokenizer"):
        raise SparsecError(f"artifact '{artifact}' was made from {source.get('model')!r}, which has no tokenizer:"
                           " sparsec eval needs a Hugging Face directory or a builtin: model, to tokenize the text"
                           " and to load the dense model from")
    tokenizer = AutoTokenizer.from_pretrained(source["tokenizer"], local_files_only=True)
    with progress.task("load dense model"):
        dense = load_model(source["model"], None).module.eval()
    sparse = art.program.module()
    layout = program_layout(art.program)
    if layout is not None:  # a cached program: logits at every position, from an empty cache
        sparse = FullSequence(sparse, layout)
    result = {"artifact": artifact, "model": source["model"], "pipeline": art.manifest.get("pipeline")}
    if ppl:
        ids = tokenize_windows(text, tokenizer, seq_len, samples)
        result.update(metric="perplexity", text=ppl, samples=int(ids.shape[0]), seq_len=int(ids.shape[1]),
                      dense=round(perplexity(dense, ids, batch_size, "eval: dense"), 4),
                      transformed=round(perplexity(sparse, ids, batch_size, "eval: transformed"), 4))
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()][:samples]
        a = embeddings(dense, tokenizer, lines, seq_len, batch_size, "eval: dense")
        b = embeddings(sparse, tokenizer, lines, seq_len, batch_size, "eval: transformed")
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        result.update(metric="mean cosine similarity of embeddings (transformed vs dense)", text=embed,
                      samples=len(lines), mean_cosine=round(float(cos.mean()), 6), min_cosine=round(float(cos.min()), 6))
    return result
