"""TVM builds of quantized artifacts (the ``quantize`` pass): linear layers run sparsec's quantized kernels on the
packed integers (the build holds no float copy of those weights), embeddings dequantize their gathered rows, and
greedy generation through the KV cache equals the torch artifact's token for token (no threshold tie arose on these
prompts: plain equality)."""
import json
import os

import pytest
import torch

import sparsec
from sparsec.api import load_artifact
from sparsec.calibration import token_forward_loop
from sparsec.generation import generate
from tests.zoo import build

pytest.importorskip("tvm")

PROMPT = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
NEW = 32


def _build(tmp_path, arch, spec, target="llvm"):
    model, example = build(arch)
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, spec, example_inputs=example, forward_loop=loop if "teal" in spec else None,
                               measure=False, kv_cache=True)
    art, out = str(tmp_path / "art"), str(tmp_path / "build")
    sparsec.save(result, art)
    sparsec.compile(art, out, threads=2, target=target)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    floats = sum(p.numel() * 4 for p in model.parameters())
    return art, out, manifest, floats


def _kinds(manifest):
    """Kernel name prefixes without the shape: e.g. {'sparsec_linear_int4g32_threshold', ...}."""
    return {name.rsplit("_", 3)[0] for name in manifest["kernels"]}


@pytest.mark.parametrize("symmetric,fmt", [("true", "int4g32s16"),  # offsets: the fast set builds them for Gemma
                                           pytest.param("false", "int4g32s16o", marks=pytest.mark.slow)])
def test_int4_teal_llama_generates_like_the_artifact(tmp_path, symmetric, fmt):
    """Every linear takes the int4 kernel with fp16 scales (and offsets: symmetric=false; the thresholded ones fused,
    the LM head dense), the weights file is under a quarter of the float32 weights, and 32 greedy tokens equal the
    artifact's."""
    art, out, manifest, floats = _build(tmp_path, "llama", f"quantize{{bits=4 group=32 scale_dtype=float16"
                                        f" symmetric={symmetric}}},teal{{sparsity=0.5}}")
    assert _kinds(manifest) == {f"sparsec_linear_{fmt}_threshold", f"sparsec_linear_{fmt}_dense"}
    assert os.path.getsize(os.path.join(out, "params.bin")) < floats / 4
    want = generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert len(set(want[0, PROMPT.shape[1]:].tolist())) > 4  # not one token repeated
    assert torch.equal(generate(out, PROMPT, max_new_tokens=NEW, ignore_eos=True), want)


@pytest.mark.parametrize("spec,kind", [  # symmetric int4's gather is int4g32o's without the offsets: slow set
    ("quantize", "int8g0"), pytest.param("quantize{bits=4 group=32}", "int4g32", marks=pytest.mark.slow),
    ("quantize{bits=4 group=32 symmetric=false}", "int4g32o")])
def test_gemma3_tied_embedding_generates_like_the_artifact(tmp_path, spec, kind):
    """Gemma 3's LM head is tied to its embedding: the head takes the quantized kernel, the embedding gathers its
    rows from the head's packed weights (the table is stored once: no [vocab, hidden] integer parameter, one
    packed one) and dequantizes them; sliding-window layers included, 32 greedy tokens equal the artifact's."""
    model, _ = build("gemma3")
    vocab = model.config.vocab_size
    art, out, manifest, _ = _build(tmp_path, "gemma3", spec)
    assert _kinds(manifest) == {f"sparsec_linear_{kind}_dense"}
    integers = [p["shape"] for p in manifest["params"] if p["dtype"] in ("int8", "uint8")]
    assert [s for s in integers if s[0] == vocab] == []
    quantized = [name for name in load_artifact(art).program.state_dict if name.endswith("_q")]
    # one packed tensor per quantized weight, q/k/v and gate/up concatenated (7 -> 4 a layer), the tied one once
    assert len(integers) == len(quantized) - 3 * model.config.num_hidden_layers
    want = generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(generate(out, PROMPT, max_new_tokens=NEW, ignore_eos=True), want)


@pytest.mark.slow
def test_int8_teal_gpt2_conv1d_generates_like_the_artifact(tmp_path):
    """GPT-2's Conv1D (addmm with a transposed dequantized weight) takes the int8 kernel."""
    art, out, manifest, _ = _build(tmp_path, "gpt2", "quantize,teal{sparsity=0.5}")
    assert "sparsec_linear_int8g0_threshold" in _kinds(manifest)
    want = generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(generate(out, PROMPT, max_new_tokens=NEW, ignore_eos=True), want)


@pytest.mark.parametrize("symmetric,fmt", [("true", "int4g32s16"),
                                           pytest.param("false", "int4g32s16o", marks=pytest.mark.slow)])
def test_cuda_build_takes_the_quantized_kernels(tmp_path, symmetric, fmt):
    """--target cuda (built and checked by nvcc here; run only on a GPU) of a program captured with a KV cache: every
    linear calls the quantized GPU kernel (:func:`sparsec.backends.tvm.cuda.cuda_quantized_kernel`) on packed int4
    weights and fp16 scales (and offsets: symmetric=false), and the build stores no float copy of a weight matrix
    (integers and scales only, besides 1-D parameters). (The cache inputs' lengths share one symbol: else the
    decomposed attention's scores plus mask lose their shape and the build fails.)"""
    from sparsec.backends.tvm.cuda import require_nvcc
    from sparsec.errors import SparsecError

    try:
        require_nvcc()
    except SparsecError as exc:
        pytest.skip(str(exc))
    _, _, manifest, _ = _build(tmp_path, "llama", f"quantize{{bits=4 group=32 scale_dtype=float16"
                               f" symmetric={symmetric}}},teal{{sparsity=0.5}}", target="cuda")
    assert manifest["target"] == "cuda" and manifest["generation"]["max_context"] > 0
    assert _kinds(manifest) == {f"sparsec_linear_{fmt}_threshold", f"sparsec_linear_{fmt}_dense"}
    kinds = {(p["dtype"], len(p["shape"])) for p in manifest["params"]}
    assert kinds <= {("uint8", 2), ("float16", 2), ("float32", 1)} and ("uint8", 2) in kinds
