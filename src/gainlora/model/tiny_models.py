"""Random-init model configs for the tiny presets (``gainlora.model.tiny``), one per family.

Decoder-only families share one recipe (hidden size, depth, heads, MLP width); each family then
adds what makes it itself: grouped-query attention (one key/value head for two query heads) on
Qwen, Mistral, Gemma and Phi-3, Qwen3's and Gemma 3's q/k norms, Gemma's explicit head size (and
Gemma 2/3's sliding-window layers, with a window shorter than the test prompts), Phi-3's fused
qkv projection, Phi's partial rotary and biased projections.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from gainlora.model.tiny import TinySpec

# arch -> (config class, model class, extra config fields)
CAUSAL = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"gqa": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"gqa": True, "head_dim": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"gqa": True, "sliding_window": None}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"gqa": True, "head_dim": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"gqa": True, "head_dim": True, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"gqa": True, "head_dim": True, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"gqa": True}),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
}
ARCHS = ("t5", *CAUSAL)


def make_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if spec.d_model % spec.heads:
        raise ValueError("d_model must be divisible by heads")
    if spec.arch == "t5":
        config = transformers.T5Config(
            vocab_size=len(tokenizer),
            d_model=spec.d_model,
            d_kv=spec.d_model // spec.heads,
            d_ff=spec.d_ff,
            num_layers=spec.layers,
            num_decoder_layers=spec.decoder_layers or spec.layers,
            num_heads=spec.heads,
            dropout_rate=0.0,  # tiny models trained for a few hundred steps: dropout only slows them
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
        return transformers.T5ForConditionalGeneration(config)
    if spec.arch not in CAUSAL:
        raise ValueError(f"unknown arch {spec.arch!r}; expected one of {', '.join(ARCHS)}")
    config_name, model_name, extra = CAUSAL[spec.arch]
    fields = dict(extra)
    if fields.pop("gqa", False):
        fields["num_key_value_heads"] = max(1, spec.heads // 2)
    else:
        fields["num_key_value_heads"] = spec.heads
    if fields.pop("head_dim", False):
        fields["head_dim"] = spec.d_model // spec.heads
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=spec.d_model,
        intermediate_size=spec.d_ff,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        **fields,
        **ids,
    )
    return getattr(transformers, model_name)(config)
