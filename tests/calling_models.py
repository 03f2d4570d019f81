"""Random-weight Hugging Face models of architectures tests/zoo.py does not use, for the calling-convention tests."""
import torch


def opt():
    """(OPT causal LM, input_ids [2, 7]); OPT's MLP activation is already ReLU."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = tf.OPTForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, torch.randint(0, 128, (2, 7))


def roberta():
    """(RoBERTa encoder with its pooler, example inputs incl. token_type_ids); outputs last_hidden_state and
    pooler_output."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=128, max_position_embeddings=40, type_vocab_size=2, hidden_act="relu")
    model = tf.RobertaModel(cfg).eval()
    ids = torch.randint(3, 128, (2, 6))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def assert_takes_the_calling_convention(call, reference, ids: torch.Tensor, tol: dict) -> None:
    """``call`` (a TVM build or ONNX model of :func:`opt`) takes ``input_ids`` alone (the mask defaults), by keyword
    or in a dict, torch or numpy: outputs named ``logits``, equal to ``reference`` (the model's logits) within ``tol``,
    numpy for numpy inputs and equal to the torch ones."""
    import numpy as np

    got = call(input_ids=ids)
    assert list(got) == ["logits"]
    torch.testing.assert_close(got["logits"], reference, **tol)
    from_numpy = call({"input_ids": ids.numpy()})["logits"]
    assert isinstance(from_numpy, np.ndarray)
    np.testing.assert_array_equal(from_numpy, got[0].numpy())
