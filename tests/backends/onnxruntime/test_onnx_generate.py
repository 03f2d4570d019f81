"""Generation from a cached ONNX export (sparsec.backends.onnxruntime.generate.OrtStepper) against the torch artifact.

Real ONNX Runtime sessions on zoo models. Threshold ties (tests/backends/parity.py): when ORT's tokens differ from
torch's, ORT's greedy run is replayed step by step through a copy of the model that also outputs its threshold
masks; every step, fed ORT's own cache, must match the torch program run with ORT's decisions, which may differ
from torch's own only at ties (within fp32 rounding of t), and the tokens must equal torch's up to the first step
where such a tie flipped a decision. On these prompts no tie occurs (replayed once: none differs), so all 32 tokens
are compared and the replay does not run.
"""
import json
import os

import numpy as np
import pytest
import torch

import sparsec
from sparsec import frontend
from sparsec.api import TransformResult
from sparsec.calibration import token_forward_loop
from sparsec.errors import UsageError
from sparsec.pipeline import Pipeline
from tests.backends.parity import assert_matches_with_decisions
from tests.cli_helpers import run_cli
from tests.zoo import build

pytest.importorskip("onnxruntime")
PROMPT = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
NEW = 32


def _no_pass_artifact(arch: str, path, kv_cache: bool = True, tokenizer: str | None = None) -> str:
    """An artifact of the zoo model captured with no pass run (the empty pipeline)."""
    model, example = build(arch)
    captured = frontend.capture(frontend.load_model(model, example), kv_cache=kv_cache)
    source = {"model": f"zoo {arch}", "kind": "module", **({"tokenizer": tokenizer} if tokenizer else {})}
    generation = {"eos_token_id": 0, "max_context": 64} if kv_cache else None
    result = TransformResult(captured.program, Pipeline(()), {}, source, captured.args, captured.kwargs, generation)
    return sparsec.save(result, str(path)) or str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(artifact dir, program, dense .onnx, sparse .onnx): the zoo Llama after teal 0.5 with a KV cache, exported
    with --verify; the sparse copy has every thresholded linear on sparsec's custom op (the standard-op gather
    without a compiler)."""
    import onnx_ir as ir

    from sparsec.backends.onnxruntime.kernels import compiler
    from sparsec.backends.onnxruntime.sparse import apply_sparse_kernels

    tmp = tmp_path_factory.mktemp("ort_generate")
    model, example = build("llama")
    calib = token_forward_loop(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)))
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, forward_loop=calib,
                               kv_cache=True, measure=False)
    art = str(tmp / "art")
    sparsec.save(result, art)
    dense = tmp / "dense.onnx"
    export = sparsec.export_onnx(art, str(dense), verify=True)
    assert export.verification["ok"], export.verification
    labels = [r["inputs"] for r in export.verification["runs"]]
    assert labels[0] == "example inputs" and "past 0" in labels[2] and "one-token step" in labels[1], labels
    proto = ir.load(str(dense))
    info = apply_sparse_kernels(proto, result.program, "all" if compiler() else "gather")
    assert len(info["layers"]) == 14
    sparse = tmp / "sparse.onnx"
    ir.save(proto, str(sparse))
    return art, result.program, dense, sparse


def _replay_up_to_ties(onnx_path, program, tokens: torch.Tensor, prompt: int) -> int:
    """Replay ORT's greedy ``tokens`` step by step (see the module docstring); returns how many generated tokens
    must equal torch's: all, or those before the first step where a decision differs from torch's (a tie)."""
    from sparsec.kv_cache import cached_output_names
    from sparsec.backends.onnxruntime.runtime import decision_session
    from sparsec.kv_cache import program_layout

    probe, decision_of = decision_session(str(onnx_path), program)
    names = [o.name for o in probe.get_outputs()]
    layout = program_layout(program)
    outputs = cached_output_names(layout.layers)
    keys, values = layout.empty_past(1)
    past = dict(zip(layout.past_names(), (t.numpy() for t in (*keys, *values))))
    ids = tokens[:, :prompt]
    for j in range(prompt, tokens.shape[1]):
        feed = {"input_ids": ids.numpy(), "logits_to_keep": np.array([ids.shape[1] - 1]), **past}
        out = dict(zip(names, probe.run(None, feed)))
        assert int(out["logits"][0, -1].argmax()) == int(tokens[0, j])  # the replay is ORT's own run
        differ = assert_matches_with_decisions([out[n] for n in outputs], {n: out[v] for n, v in decision_of.items()},
                                               program, feed)
        if differ:
            return j - prompt + 1  # this step's token is ORT's, with a decision torch takes otherwise
        past = {n.replace("present_", "past_"): out[n] for n in outputs[1:]}
        ids = tokens[:, j:j + 1]
    return tokens.shape[1] - prompt


def test_llama_teal_greedy_equals_torch(llama):
    """32 greedy tokens from the dense and the sparse-kernel export equal the torch artifact's."""
    art, program, dense, sparse = llama
    want = sparsec.generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    got = sparsec.generate(str(dense), PROMPT, max_new_tokens=NEW, ignore_eos=True)
    if not torch.equal(got, want):  # up to threshold ties (see the module docstring)
        same = PROMPT.shape[1] + _replay_up_to_ties(dense, program, got, PROMPT.shape[1])
        assert torch.equal(got[:, :same], want[:, :same]), (got, want)
    sparse_tokens = sparsec.generate(str(sparse), PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(sparse_tokens, want)  # SparseLinear outputs no masks to replay: exact (no tie on this prompt)


def test_prefill_at_cache_length_zero(llama):
    """A prefill (past 0) through the stepper gives torch's last-position logits and fills the cache; a batch-2
    prefill of every position matches the torch program (tie-aware verify_onnx)."""
    from sparsec.backends.onnxruntime.generate import OrtStepper
    from sparsec.backends.onnxruntime.runtime import verify_onnx
    from sparsec.generation import TorchStepper

    _, program, dense, _ = llama
    stepper = OrtStepper(str(dense), threads=1)
    assert stepper.backend == "onnxruntime" and stepper.cache_length == 0
    assert stepper.layout.layers == 2 and stepper.layout.key_shapes == ((2, 16),) * 2
    logits = stepper.step(PROMPT)
    assert logits.shape == (256,) and logits.dtype == torch.float32 and stepper.cache_length == PROMPT.shape[1]
    torch.testing.assert_close(logits, TorchStepper(program).step(PROMPT), rtol=1e-4, atol=1e-4)
    stepper.reset()
    assert stepper.cache_length == 0
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    feed = {"input_ids": ids, "logits_to_keep": torch.arange(7),
            **{n: torch.zeros(2, 2, 0, 16) for n in stepper.layout.past_names()}}
    v = verify_onnx(str(dense), program, feed)
    assert v["ok"] and v["runs"][0]["shapes"]["past_keys_0"] == [2, 2, 0, 16], v
    assert v["runs"][0]["output_names"] == ["logits", "present_keys_0", "present_keys_1", "present_values_0",
                                            "present_values_1"]


def test_gpt2_cli_export_verify_tokenizer_and_greedy(tmp_path, capsys):
    """GPT-2 with no pass: `sparsec export --verify` names the cached inputs and outputs, records the generation
    facts, copies the artifact's tokenizer beside the model; 32 greedy tokens equal the artifact's."""
    import onnx

    from sparsec.generation import open_stepper

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    art = _no_pass_artifact("gpt2", tmp_path / "art", tokenizer=str(tok))
    path = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "export", art, "--to", "onnx", "-o", path, "--verify")
    assert code == 0, err
    assert ("inputs:  input_ids int64[batch, seq], logits_to_keep int64[kept], past_keys_0 float32[batch, 4, past, 16]"
            in out), out
    assert "outputs: logits float32[batch, kept, 256], present_keys_0 float32[batch, 4, past + seq, 16]" in out, out
    assert out.count("  ok\n") == 3, out
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["sparsec.generation"]) == {"eos_token_id": 0, "max_context": 64}
    assert sorted(os.listdir(tmp_path)) == ["art", "m.onnx", "m.tokenizer", "tok"]
    assert (tmp_path / "m.tokenizer" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    stepper, info = open_stepper(str(path))
    assert info == {"eos_token_id": 0, "max_context": 64, "tokenizer": str(tmp_path / "m.tokenizer")}
    assert stepper.layout.max_context == 64
    got = sparsec.generate(str(path), PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(got, sparsec.generate(art, PROMPT, max_new_tokens=NEW, ignore_eos=True))
    with pytest.raises(UsageError, match="maximum context"):
        sparsec.generate(str(path), PROMPT, max_new_tokens=60)
    code, _, err = run_cli(capsys, "export", art, "--to", "onnx", "-o", path, "--force")  # replaces both
    assert code == 0 and sorted(os.listdir(tmp_path / "m.tokenizer")) == ["tokenizer.json"], err


def test_uncached_onnx_cannot_generate(tmp_path):
    from sparsec.backends.onnxruntime.generate import OrtStepper

    art = _no_pass_artifact("gpt2", tmp_path / "art", kv_cache=False)
    path = str(tmp_path / "m.onnx")
    sparsec.export_onnx(art, path)
    for attempt in (lambda: OrtStepper(path), lambda: sparsec.generate(path, PROMPT)):
        with pytest.raises(UsageError) as exc:
            attempt()
        message = str(exc.value)
        assert "\n" not in message and message.startswith(f"'{path}' takes no KV cache, so it cannot generate")
