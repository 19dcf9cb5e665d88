"""Backbone loading and the choice of adapted layers.

Users name a Hugging Face model or a local path (``from_pretrained``); tests and the demo name a
tiny preset that the project builds locally (``gainlora.model.tiny``), since no hub is reachable.

GainLoRA adapts the query and value projections of every attention block (docs/method.md). Their
module names differ between architectures, so they are looked up per ``config.model_type``
(``ADAPTED``); a model type not in the table falls back to discovery: ``q_proj``/``v_proj``
linears inside modules whose class name says attention. Phi-3 computes q, k and v with one fused
``qkv_proj``; ``split_fused_qkv`` replaces it by an equivalent module with separate ``q``, ``k``,
``v`` linears (views of the fused weight), so only q and v are adapted, as on every other model.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

_SELF_ATTN_QV = r"\.self_attn\.(q_proj|v_proj)$"
# model_type -> pattern of the adapted q and v projections' module names.
ADAPTED = {
    **{t: r"\.(SelfAttention|EncDecAttention)\.(q|v)$" for t in ("t5", "mt5", "umt5")},
    **{t: _SELF_ATTN_QV for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2",
                                  "gemma3_text", "phi", "starcoder2", "olmo", "olmo2", "granite")},
    "phi3": r"\.self_attn\.qkv_proj\.(q|v)$",  # after split_fused_qkv
}
# Discovery for model types not in the table: q/v projections inside an attention block.
DISCOVERED = re.compile(r"\.(q_proj|v_proj)$")
# Cross-attention values read the encoder output, not the decoder stream.
CROSS_ATTENTION_VALUE = re.compile(r"\.EncDecAttention\.v$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "seq2seq" | "causal"

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


class FusedQKV(nn.Module):
    """Phi-3's fused ``qkv_proj`` as three linears whose outputs are concatenated: the same
    function, with q and v addressable as ``qkv_proj.q`` and ``qkv_proj.v``."""

    def __init__(self, fused: nn.Linear, q_size: int, kv_size: int) -> None:
        super().__init__()
        bounds = {"q": (0, q_size), "k": (q_size, q_size + kv_size), "v": (q_size + kv_size, q_size + 2 * kv_size)}
        if bounds["v"][1] != fused.out_features:
            raise ValueError(f"qkv_proj has {fused.out_features} outputs, expected {bounds['v'][1]}")
        for name, (lo, hi) in bounds.items():
            part = nn.Linear(fused.in_features, hi - lo, bias=fused.bias is not None,
                             device=fused.weight.device, dtype=fused.weight.dtype)
            part.weight = nn.Parameter(fused.weight.detach()[lo:hi], requires_grad=False)  # a view: no copy
            if fused.bias is not None:
                part.bias = nn.Parameter(fused.bias.detach()[lo:hi], requires_grad=False)
            setattr(self, name, part)

    def forward(self, h: Tensor) -> Tensor:
        return torch.cat([self.q(h), self.k(h), self.v(h)], dim=-1)


def split_fused_qkv(model: nn.Module) -> int:
    """Replace every Phi-3 ``self_attn.qkv_proj`` by a ``FusedQKV``; returns how many."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    names = [n for n, m in model.named_modules() if n.endswith("self_attn.qkv_proj") and isinstance(m, nn.Linear)]
    for name in names:
        replace_module(model, name, FusedQKV(model.get_submodule(name), config.num_attention_heads * head_dim,
                                             kv_heads * head_dim))
    return len(names)


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


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" bar at every ``from_pretrained`` (a run's log and each
    ``predict`` show it for a model already on disk); download bars are huggingface_hub's own and stay."""
    def hook(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def load_backbone(name_or_path: str | None = None, *, tiny: str | None = None, dtype: str = "float32",
                  cache_dir: str | None = None, tiny_overrides: dict | None = None,
                  text_corpus: dict | None = None, attn_implementation: str | None = None) -> Backbone:
    """Load a frozen backbone and its tokenizer (``tiny``: a locally built preset, optionally with
    some of its fields changed by ``tiny_overrides``, pre-trained on ``text_corpus`` when given;
    ``attn_implementation``: Hugging Face's "eager", "sdpa" or "flash_attention_2", None for its default)."""
    path = resolve_path(name_or_path, tiny, cache_dir, tiny_overrides, text_corpus)
    if dtype not in DTYPES:
        raise ValueError(f"backbone.dtype: unknown {dtype!r}; expected one of {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(path)
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    with _no_loading_bar():
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # LLaMA tokenizers ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(config, "model_type", None) == "phi3":
        split_fused_qkv(model)
    model.requires_grad_(False)
    model.eval()
    return Backbone(model=model, tokenizer=tokenizer, kind=kind)


def _discover(model: nn.Module) -> dict[str, nn.Linear]:
    """q_proj/v_proj linears of attention modules, and the q and v parts of split fused projections."""
    modules = dict(model.named_modules())

    def adapted(name: str, module: nn.Module) -> bool:
        parent = modules.get(name.rpartition(".")[0])
        if not isinstance(module, nn.Linear):
            return False
        if isinstance(parent, FusedQKV):
            return name.endswith((".q", ".v"))
        return bool(DISCOVERED.search(name)) and "attention" in type(parent).__name__.lower()

    return {name: m for name, m in modules.items() if adapted(name, m)}


def adapted_layers(model: nn.Module, kind: str) -> dict[str, tuple[nn.Linear, str]]:
    """{name: (linear, stream)} for every layer GainLoRA adapts; stream feeds its covariance mask."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTED:
        pattern = re.compile(ADAPTED[model_type])
        linears = {n: m for n, m in model.named_modules() if pattern.search(n) and isinstance(m, nn.Linear)}
    else:
        linears = _discover(model)
        if linears:
            log.info("%s: adapting the q_proj/v_proj linears of its attention blocks (%d layers); "
                     "model type %r is not in backbone.ADAPTED", type(model).__name__, len(linears), model_type)
    found = {}
    for name, module in linears.items():
        if kind == "causal":
            stream = "decoder"
        elif name.startswith("encoder.") or CROSS_ATTENTION_VALUE.search(name):
            stream = "encoder"
        else:
            stream = "decoder"
        found[name] = (module, stream)
    if not found:
        raise ValueError(f"no q/v projections found in {type(model).__name__} (model type {model_type!r}); "
                         "add its module-name pattern to gainlora.model.backbone.ADAPTED")
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
