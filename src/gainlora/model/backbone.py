"""Backbone loading and the choice of adapted layers.

Users name a Hugging Face model or a local path (``from_pretrained``); tests and the demo name a
tiny preset that the project builds locally (``gainlora.model.tiny``), since no hub is reachable.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

log = logging.getLogger(__name__)

# Layers adapted per family (METHOD.md): q and v of every attention block.
TARGETS = {"seq2seq": r"\.(SelfAttention|EncDecAttention)\.(q|v)$", "causal": r"\.self_attn\.(q_proj|v_proj)$"}
# Cross-attention values read the encoder output, not the decoder stream.
CROSS_ATTENTION_VALUE = re.compile(r"\.EncDecAttention\.v$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "seq2seq" | "causal"
    source: str

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


def resolve_path(name_or_path: str | None, tiny: str | None, cache_dir: str | None = None,
                 tiny_overrides: dict | None = None, text_corpus: dict | None = None) -> str:
    if tiny and text_corpus:  # a tiny T5 pre-trained on benchmark text (gainlora.model.pretrain)
        from gainlora.model.pretrain import build_text_backbone

        return str(build_text_backbone(tiny, text_corpus, cache_dir=cache_dir, overrides=tiny_overrides))
    if tiny:
        from gainlora.model.tiny import build_tiny_backbone, with_overrides

        spec = with_overrides(tiny, **tiny_overrides) if tiny_overrides else tiny
        return str(build_tiny_backbone(spec, cache_dir=cache_dir))
    if not name_or_path:
        raise ValueError("backbone: set either backbone.name_or_path or backbone.tiny")
    return name_or_path


def load_backbone(name_or_path: str | None = None, *, tiny: str | None = None, dtype: str = "float32",
                  kind: str | None = None, cache_dir: str | None = None,
                  tiny_overrides: dict | None = None, text_corpus: dict | None = None) -> Backbone:
    """Load a frozen backbone and its tokenizer (``tiny``: a locally built preset, optionally with
    some of its fields changed by ``tiny_overrides``, pre-trained on ``text_corpus`` when given)."""
    path = resolve_path(name_or_path, tiny, cache_dir, tiny_overrides, text_corpus)
    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype: unknown {dtype!r}; expected one of {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(path)
    detected = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    if kind and kind != detected:
        raise ValueError(f"backbone.kind is {kind!r} but {path} is a {detected} model")
    auto = AutoModelForSeq2SeqLM if detected == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return Backbone(model=model, tokenizer=tokenizer, kind=detected, source=path)


def adapted_layers(model: nn.Module, kind: str) -> dict[str, tuple[nn.Linear, str]]:
    """{name: (linear, stream)} for every layer GainLoRA adapts; stream feeds its covariance mask."""
    pattern = re.compile(TARGETS[kind])
    found = {}
    for name, module in model.named_modules():
        if not (pattern.search(name) and isinstance(module, nn.Linear)):
            continue
        if kind == "causal":
            stream = "decoder"
        elif name.startswith("encoder.") or CROSS_ATTENTION_VALUE.search(name):
            stream = "encoder"
        else:
            stream = "decoder"
        found[name] = (module, stream)
    if not found:
        raise ValueError(f"no q/v projections found in {type(model).__name__}; unsupported backbone")
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)

