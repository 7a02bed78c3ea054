"""Small causal language models of a Hugging Face architecture, built from a config with random
weights (no download): the `hf:<model_type>` targets of `nsa-compile inspect` and the demo's
model."""
from __future__ import annotations

from typing import Any

from torch import nn

# Names shared by most configs; GPT-2-style configs map them through their attribute_map
# (hidden_size -> n_embd, ...) and ignore the ones they lack. Token ids 0-2 exist in any vocab.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_hf(model_type: str, **overrides: Any) -> nn.Module:
    """A randomly initialised `AutoModelForCausalLM` of `model_type` ("llama", "qwen2",
    "mistral", "gpt2", "phi3", ...) with the sizes of `SMALL` updated by `overrides`, in eval
    mode. Raises ValueError naming the model type when transformers has no causal LM for it."""
    import transformers

    try:
        config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    except ValueError:
        raise ValueError(f"unknown Hugging Face model type {model_type!r} (transformers "
                         f"{transformers.__version__}); try hf:llama, hf:qwen2, hf:mistral, "
                         "hf:gpt2 or hf:phi3") from None
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        raise ValueError(f"Hugging Face model type {model_type!r} has no causal language model "
                         "class (AutoModelForCausalLM); NSA rewrites causal attention, try "
                         "hf:llama, hf:qwen2, hf:mistral, hf:gpt2 or hf:phi3") from None
    return model.eval()
