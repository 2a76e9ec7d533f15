import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 49152  # SmolLM2's tokenizer, so tiny models can run real prompts

# Tiny random-weight configs of several decoder-only families: (model_type, options).
FAMILIES = {
    "opt": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=256),
    "llama": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gemma": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                  intermediate_size=64, max_position_embeddings=256),
    "mistral": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=256, sliding_window=None),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=256),
}


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=VOCAB, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                                  **FAMILIES[family])
    for name in ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer, from the offline package (converted and cached on first use)."""
    from zotune.models import ModelConfig, load_model

    _, tok = load_model(ModelConfig(), log=lambda *a: None)
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a normal HF folder, with the real tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """40 one-line reviews labelled pos / neg, as a CSV file (tests must not change it)."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("text,label\n" + "".join(
        f"film {i} was {'wonderful' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    return path


def exported(run, out):
    """Every weight of the model a run ends with, by name (through `zotune export`)."""
    from safetensors.torch import load_file

    from zotune.cli import main

    assert main(["export", str(run), "--out", str(out)]) == 0
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
