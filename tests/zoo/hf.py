"""Real Hugging Face architectures built from tiny configs (no download)."""
from __future__ import annotations

import torch
import transformers as tf

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt2")
IMPLS = ("sdpa", "eager")
VOCAB = 64


def tiny_hf(family: str, impl: str, layers: int = 2, heads: int = 4, kv_heads: int = 2,
            hidden: int = 32, **extra) -> torch.nn.Module:
    """A randomly initialised causal LM of `family` in eval mode, attention implementation
    `impl` ("sdpa" or "eager"). GPT-2 has no GQA and keeps its default attn_pdrop=0.1."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=None)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, **extra)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, **extra)
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, **extra)  # sliding_window=4096 > T: plain causal
        cls = tf.MistralForCausalLM
    elif family == "phi3":
        cfg = tf.Phi3Config(**common, **extra)  # fused qkv_proj sliced by hand
        cls = tf.Phi3ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=128, bos_token_id=1, eos_token_id=None, pad_token_id=0,
                            **extra)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    cfg._attn_implementation = impl
    return cls(cfg).eval()


def kv_heads_of(family: str, heads: int = 4, kv_heads: int = 2) -> int:
    return heads if family == "gpt2" else kv_heads
