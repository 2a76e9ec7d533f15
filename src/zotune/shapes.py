"""Random-weight model shapes, by name: benchmarks and scale runs build them from these configs.

Model knowledge as data: each entry is the keyword arguments of a transformers config.
"""

from __future__ import annotations

from zotune.config import ConfigError

_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0)

SHAPES = {
    "tiny": dict(_OPT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64),
    "opt-125m": dict(_OPT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     word_embed_proj_dim=768),
    "opt-350m": dict(_OPT, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=1024),
    # Gemma-3-270M's text model: a 262k vocabulary (168M of its 268M parameters are the embedding)
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                         max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Llama-2-7B's shape: 6.7B parameters, 27 GB in float32.
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                     rms_norm_eps=1e-5),
}


def random_config(name: str, **overrides):
    """The transformers config of shape `name`, e.g. `random_config("opt-125m", num_hidden_layers=48)`."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name], **overrides)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
