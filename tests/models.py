"""Tiny random models built from real published configs, shrunk.

Each entry is the architecture-defining part of a real `config.json` (rope
settings, grouped-query ratio, sliding windows, biases, scaling); `tiny(name)`
keeps those and shrinks the sizes so a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

REAL_CONFIGS = {
    # meta-llama/Llama-3.1-8B-Instruct
    "llama": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128009,
    ),
    # Qwen/Qwen2-0.5B-Instruct (q/k/v projections carry a bias)
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        vocab_size=151936,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=24,
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # mistralai/Mistral-7B-Instruct-v0.1 (sliding-window attention on every layer)
    "mistral": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        vocab_size=32000,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    # google/gemma-3-1b-it (5 sliding-window layers per full layer, query_pre_attn_scalar scaling)
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        vocab_size=262144,
        sliding_window=512,
        sliding_window_pattern=6,
        rope_theta=1000000,
        rope_local_base_freq=10000,
        hidden_activation="gelu_pytorch_tanh",
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    ),
}

# The shrink: sizes only. Heads keep the real grouped-query ratio.
_SHRINK = {
    "llama": dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16, hidden_size=128),
    "qwen2": dict(
        num_hidden_layers=4, num_attention_heads=7, num_key_value_heads=1, hidden_size=112, max_window_layers=4
    ),
    "mistral": dict(
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, hidden_size=128, sliding_window=8
    ),
    "gemma3": dict(
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        hidden_size=64,
        sliding_window=8,
    ),
}
TEXT_MODELS = tuple(REAL_CONFIGS)


def tiny_config(name: str, **overrides):
    from transformers import AutoConfig  # noqa: PLC0415

    fields = dict(REAL_CONFIGS[name])
    fields.update(_SHRINK[name])
    fields.update(intermediate_size=2 * fields["hidden_size"], vocab_size=256, max_position_embeddings=16384)
    fields.update({k: v for k, v in dict(bos_token_id=1, eos_token_id=2, pad_token_id=0).items()})
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def tiny(name: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random causal LM of the named architecture, in eval mode, SDPA attention."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():  # larger weights than the init: sharper attention, so edits change outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


def batch(vocab: int = 256, B: int = 3, T: int = 13, left_pad: tuple[int, ...] = (0, 4, 7), seed: int = 1):
    """Random input ids with left padding (row b has left_pad[b] padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(left_pad[:B]):
        ids[b, :n] = 0
        mask[b, :n] = 0
    return ids, mask
