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
