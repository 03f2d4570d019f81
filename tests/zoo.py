"""Small random-weight Hugging Face models built from configs (hidden 64, 2 layers), with example inputs."""
import torch

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)


def build(arch: str, **overrides):
    """(model, example kwargs) for arch in llama, mistral, qwen2, gemma3, phi3, gpt_neox, gpt2, bert; overrides go
    into the config. gemma3 alternates sliding-window (window 8) and full attention layers; phi3 has fused
    gate_up_proj (chunked) and qkv_proj (sliced), gpt_neox a fused query_key_value."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**SMALL, "num_key_value_heads": 2, **overrides})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=16, **overrides)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**SMALL, num_key_value_heads=2, **overrides)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=1, head_dim=16,
                                  sliding_window=8, max_position_embeddings=256,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  **overrides)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                            max_position_embeddings=64, **overrides)
        model = tf.Phi3ForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**SMALL, max_position_embeddings=64, **overrides)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=256, n_positions=64,
                            bos_token_id=0, eos_token_id=0, **overrides)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(**SMALL, max_position_embeddings=64, **overrides)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(arch)
    model.config.use_cache = False
    ids = torch.randint(0, 256, (2, 12))
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


RELU_OVERRIDE = {"llama": {"hidden_act": "relu"}, "phi3": {"hidden_act": "relu"}, "gpt_neox": {"hidden_act": "relu"},
                 "mistral": {"hidden_act": "relu"}, "qwen2": {"hidden_act": "relu"},
                 "gpt2": {"activation_function": "relu"}, "bert": {"hidden_act": "relu"}}
