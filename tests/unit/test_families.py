"""Today's decoder-only families (Qwen2, Qwen3, Mistral, Gemma 1/2/3, Phi-3, Phi) on tiny random configs
built locally (tiny.py presets ``<family>-test``): which layers are adapted, a training step, the
gate initialization constraint, and batched generation equal to one-at-a-time generation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gainlora.data.collate import Collator
from gainlora.data.demo import make_demo_task
from gainlora.model.backbone import FusedQKV, adapted_layers, load_backbone
from gainlora.model.tiny import build_tiny_backbone
import functools

import lightning as L

from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.model.module import ContinualLM
from test_invariants import (BATCH, LR, N_TRAIN, SILENT, STEPS, TASKS, coefficients_on, exact_span_memories,
                             gainlora, gated_model)

FAMILIES = ("qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "phi")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny_cache: Path) -> tuple[str, Path]:
    return request.param, build_tiny_backbone(f"{request.param}-test", cache_dir=tiny_cache)


def test_q_and_v_of_every_attention_block_are_adapted(family) -> None:
    name, path = family
    backbone = load_backbone(str(path))
    layers = adapted_layers(backbone.model, backbone.kind)
    suffix = r"\.self_attn\.qkv_proj\.(q|v)$" if name == "phi3" else r"\.self_attn\.(q_proj|v_proj)$"
    assert len(layers) == 2 * backbone.model.config.num_hidden_layers
    assert all(re.search(suffix, n) for n in layers)
    assert {stream for _, stream in layers.values()} == {"decoder"}


def test_split_phi3_qkv_computes_the_fused_projection(tiny_cache: Path) -> None:
    path = build_tiny_backbone("phi3-test", cache_dir=tiny_cache)
    fused = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    split = load_backbone(str(path)).model
    assert isinstance(split.model.layers[0].self_attn.qkv_proj, FusedQKV)
    ids = torch.randint(4, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, split(input_ids=ids).logits)


def test_discovery_finds_the_table_s_layers_for_an_unlisted_model_type(family) -> None:
    name, path = family
    model = load_backbone(str(path)).model
    listed = set(adapted_layers(model, "causal"))
    model.config.model_type = f"unlisted-{name}"
    assert set(adapted_layers(model, "causal")) == listed


def test_training_step_and_new_gate_silent_on_old_task(family, make_trainer) -> None:
    """Task 0 trains (its branch moves away from B = 0), then gate 1 opens silent on task 0."""
    _, path = family
    backbone, method = load_backbone(str(path)), gainlora()
    torch.manual_seed(0)
    module = ContinualLM(backbone, rank=4, alpha=32, gates=method.gate_spec,
                         optimizer=functools.partial(torch.optim.AdamW, lr=LR, weight_decay=0.0))
    tasks = [make_demo_task(name, n_train=N_TRAIN, n_val=0, n_test=0) for name in TASKS[:2]]
    dm = TaskStreamDataModule(tasks, Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=BATCH)
    method.setup(module, 2)
    L.seed_everything(0, verbose=False)
    dm.set_task(0)
    module.current_task = 0
    method.on_task_start(module, 0, dm.feature_batches)
    make_trainer(STEPS, method.callbacks()).fit(module, train_dataloaders=dm.train_dataloader())
    assert min(layer.branch(0)[1].abs().max().item() for layer in module.adapted.values()) > 0
    method.on_task_end(module, 0, dm.feature_batches)
    exact_span_memories(module, method, dm.feature_batches)
    dm.set_task(1)
    module.current_task = 1
    method.on_task_start(module, 1, dm.feature_batches)
    assert coefficients_on(module, dm, 0)[:, 1].max().item() < SILENT
    assert coefficients_on(module, dm, 1)[:, 1].mean().item() > 100 * SILENT  # it does respond to its task


def test_batched_generation_equals_one_at_a_time(family) -> None:
    name, path = family
    backbone = load_backbone(str(path))
    module = gated_model(backbone)
    if name == "gemma2":  # transformers' eager Gemma-2 attention turns left-padded rows to NaN in float64
        module.float()
    collator = Collator(backbone.tokenizer, backbone.kind, 128, 8)
    items = [(j, e, "rougeL") for j, name in enumerate(TASKS)
             for e in make_demo_task(name, n_train=0, n_val=0, n_test=2).test]
    batch = collator.eval_batch(items)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padded
    assert module.gate_coefficients(batch).std(0).min() > 1e-3
    batched = module.generate(batch)
    single = [module.generate(collator.eval_batch([item]))[0] for item in items]
    assert batched == single
    assert any(batched)  # something was generated


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_t5_and_llama_keep_their_adapted_layers(kind: str, t5_backbone, llama_backbone) -> None:
    """The per-family table leaves the original two patterns' choice exactly as it was."""
    before = {"t5": r"\.(SelfAttention|EncDecAttention)\.(q|v)$", "llama": r"\.self_attn\.(q_proj|v_proj)$"}[kind]
    backbone = (t5_backbone if kind == "t5" else llama_backbone)()
    expected = {n for n, m in backbone.model.named_modules() if re.search(before, n) and isinstance(m, torch.nn.Linear)}
    assert set(adapted_layers(backbone.model, backbone.kind)) == expected
    assert len(expected) == {"t5": 12, "llama": 4}[kind]


# LLaMA-3-Instruct's template (tokenizer_config.json of Meta-Llama-3-8B-Instruct), without the system default.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_chat_template_wraps_sources_in_a_user_turn(llama_backbone) -> None:
    from gainlora.data.types import DataError

    backbone = llama_backbone()
    tok = backbone.tokenizer
    tok.chat_template = LLAMA3_TEMPLATE
    # Special tokens, as in LLaMA-3's tokenizer (the embedding rows are never looked up here).
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    example = make_demo_task("demo_colour", n_train=1, n_val=0, n_test=0).train[0]
    plain = Collator(tok, "causal", 128, 8)
    chat = Collator(tok, "causal", 128, 8, chat_template=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": example.source}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.startswith(tok.bos_token + "<|start_header_id|>user")
    batch = chat.eval_batch([(0, example, "rougeL")])
    assert batch["input_ids"][0].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert plain.eval_batch([(0, example, "rougeL")])["input_ids"][0, 0].item() == tok.bos_token_id  # off: as before
    train = chat.train_batch([example])
    answer = tok(example.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = train["labels"][0].tolist()
    assert labels[labels.index(next(x for x in labels if x != -100)):] == answer  # loss only on the answer
    # Truncation shortens the content and keeps the turn's markers.
    limit = len(tok(tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                            add_generation_prompt=True), add_special_tokens=False)["input_ids"]) + 5
    assert limit < len(batch["input_ids"][0])
    short = Collator(tok, "causal", limit, 8, chat_template=True).eval_batch([(0, example, "rougeL")])["input_ids"][0]
    assert limit - 2 <= len(short) <= limit
    full = batch["input_ids"][0].tolist()
    turn_end = full[full.index(tok.convert_tokens_to_ids("<|eot_id|>")):]  # eot, then the assistant header
    assert short.tolist()[-len(turn_end):] == turn_end and short.tolist()[:6] == full[:6]
    with pytest.raises(DataError, match="shorter than the chat template"):
        Collator(tok, "causal", limit - 6, 8, chat_template=True).eval_batch([(0, example, "rougeL")])
    with pytest.raises(DataError, match="backbone.chat_template=true"):
        Collator(tok, "seq2seq", 128, 8, chat_template=True)


CONFIGS = {"qwen2_5_7b": "qwen2", "qwen3_8b": "qwen3", "mistral_7b": "mistral", "gemma_7b": "gemma",
           "gemma2_9b": "gemma2", "phi3_mini": "phi3"}


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from gainlora.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("config, preset", CONFIGS.items())
def test_family_backbone_configs_debug_on_their_tiny_preset(config: str, preset: str) -> None:
    full = compose_cfg("experiment=demo", f"backbone={config}")
    assert full.backbone.name_or_path and full.backbone.family == preset
    tiny = compose_cfg("experiment=demo", f"backbone={config}", "debug=cpu_tiny")
    assert (tiny.backbone.name_or_path, tiny.backbone.tiny) == (None, f"{preset}-test")


@pytest.mark.slow
def test_phi3_runs_end_to_end_through_the_entry_point(tmp_path: Path, tiny_cache: Path) -> None:
    from gainlora.api import load_run
    from gainlora.run import run

    results = run(compose_cfg("experiment=demo", "backbone=phi3_mini", "debug=cpu_tiny", "benchmark.n_train=16",
                              "benchmark.n_test=4", f"paths.runs_dir={tmp_path}", "run_id=r",
                              f"paths.cache_dir={tiny_cache}"))
    assert results["status"] == "finished" and len(results["matrix"]) == 2
    trained = load_run(tmp_path / "demo" / "r")
    assert sorted(trained.module.adapted)[0] == "model.layers.0.self_attn.qkv_proj.q"
