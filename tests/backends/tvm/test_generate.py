"""Generation from TVM builds of cached programs (sparsec.backends.tvm.generate.TvmStepper).

Real TVM builds of zoo models: greedy tokens from the build equal the torch artifact's token for token (no threshold
tie arose on these prompts: plain equality, no tie rule needed), through the in-place cache (``decode``, also while
it grows) and through ``main``; the build's logits match the program's at a prefill (P = 0) and at one-token steps,
and the build keeps the artifact's generation facts and tokenizer files.
"""
import json
import os

import pytest
import torch

import sparsec
from sparsec import frontend
from sparsec.calibration import token_forward_loop
from sparsec.errors import UsageError
from sparsec.generation import generate, open_stepper
from tests.zoo import build

pytest.importorskip("tvm")

PROMPT = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
NEW = 32


@pytest.fixture(scope="module")
def llama_teal(tmp_path_factory):
    """(artifact dir, build dir): the zoo Llama after teal 0.5, captured with a KV cache, saved with a (stand-in)
    tokenizer and compiled from the artifact."""
    model, example = build("llama")
    loop = token_forward_loop(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, forward_loop=loop,
                               measure=False, kv_cache=True)
    root = tmp_path_factory.mktemp("gen")
    tok = root / "hf"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    result.source["tokenizer"] = str(tok)
    art, out = root / "art", root / "build"
    sparsec.save(result, str(art))
    sparsec.compile(str(art), str(out), threads=2)
    return str(art), str(out)


def test_teal_llama_greedy_tokens_equal_the_artifact(llama_teal, monkeypatch):
    """The in-place cache (starting at 8 positions: it is reallocated 3 times) and main's present tensors."""
    import sparsec.backends.tvm.generate as tvm_generate
    from sparsec.generation import run_generation

    art, out = llama_teal
    want = generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert len(set(want[0, PROMPT.shape[1]:].tolist())) > 4  # not one token repeated
    monkeypatch.setattr(tvm_generate, "START_CAPACITY", 8)
    stepper, _ = open_stepper(out, threads=2)
    assert stepper._lengths == 1  # decode: one past_length (the lowering gives every cache length one symbol)
    assert torch.equal(run_generation(stepper, PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens, want)
    assert stepper.capacity == 64 and stepper.cache_length == PROMPT.shape[1] + NEW - 1
    stepper._lengths, stepper._fn = 0, stepper.model.vm["main"]  # as a build without decode runs
    assert torch.equal(run_generation(stepper, PROMPT, max_new_tokens=NEW, ignore_eos=True).tokens, want)


def test_build_keeps_generation_facts_and_tokenizer(llama_teal):
    art, out = llama_teal
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["generation"] == {"eos_token_id": 2, "max_context": 2048}
    assert manifest["decode"] == {"lengths": 1}
    assert "tokenizer/tokenizer.json" in manifest["files"]
    stepper, info = open_stepper(out, threads=2)
    assert stepper.backend == "tvm" and stepper.layout.layers == 2 and stepper.layout.max_context == 2048
    assert info == {"eos_token_id": 2, "max_context": 2048, "tokenizer": os.path.join(out, "tokenizer")}
    assert os.path.isfile(os.path.join(info["tokenizer"], "tokenizer.json"))


def test_stepper_logits_match_the_program(llama_teal):
    """Prefill of 5 tokens (P = 0), then one-token steps: the cache stays in TVM, logits within 1e-4 of torch's."""
    from sparsec.generation import TorchStepper

    art, out = llama_teal
    stepper, _ = open_stepper(out, threads=2)
    ref = TorchStepper(sparsec.load_artifact(art).program)
    for s in (stepper, ref):
        s.reset()
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), PROMPT[:, :5]], 1)[:, 3:]  # not 64-byte aligned
    assert ids.data_ptr() % 64
    for _ in range(4):
        got, want = stepper.step(ids), ref.step(ids)
        assert got.dtype == torch.float32 and got.shape == (256,)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids = want.argmax().view(1, 1)
    assert stepper.cache_length == ref.cache_length == 8
    stepper.reset()
    assert stepper.cache_length == 0


def test_plain_gpt2_build_generates_like_the_program(tmp_path):
    from sparsec.backends.tvm.build import compile_program

    model, example = build("gpt2")
    program = frontend.capture(frontend.load_model(model, example), kv_cache=True).program
    compile_program(program, str(tmp_path / "b"), threads=2)
    want = generate(program, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(generate(str(tmp_path / "b"), PROMPT, max_new_tokens=NEW, ignore_eos=True), want)
    with open(tmp_path / "b" / "manifest.json", encoding="utf-8") as f:  # no artifact: the context limit only
        assert json.load(f)["generation"] == {"eos_token_id": None, "max_context": 64}


def test_uncached_build_cannot_generate(tmp_path):
    from sparsec.backends.tvm.build import compile_program
    from sparsec.backends.tvm.generate import TvmStepper

    program = torch.export.export(torch.nn.Linear(32, 32).eval(), (torch.randn(2, 32),))
    compile_program(program, str(tmp_path / "b"), threads=2)
    with pytest.raises(UsageError, match="takes no KV cache, so it cannot generate"):
        TvmStepper(str(tmp_path / "b"))


def test_compile_of_a_transform_result_keeps_its_generation_facts(tmp_path):
    from sparsec.calibration import token_forward_loop
    from tests import zoo

    model, example = zoo.build("llama")
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, kv_cache=True, measure=False,
                               forward_loop=token_forward_loop(torch.randint(0, 256, (4, 16))))
    sparsec.compile(result, str(tmp_path / "b"), threads=1)
    assert json.load(open(tmp_path / "b" / "manifest.json"))["generation"] == result.generation == {
        "eos_token_id": model.generation_config.eos_token_id, "max_context": 2048}
