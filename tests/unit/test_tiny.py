"""Tiny backbones: tokenizer, deterministic cached builds, loading through the real HF path.

Nothing here runs the minutes-long pre-training: only the random-init test presets are built
(a 2-step pre-training checks that code path).
"""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from gainlora.data.demo import (
    DEMO_TASKS,
    PROMPT_PIECES,
    demo_vocabulary,
    make_demo_task,
    task_instruction,
    task_labels,
)
from gainlora.model import tiny
from gainlora.model.tiny import (
    PRESETS,
    build_tiny_backbone,
    build_tokenizer,
    lr_factor,
    pretrain_words,
    train_steps,
    with_overrides,
)


@pytest.fixture(scope="module")
def t5_tok():
    return build_tokenizer("t5")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_backbone("t5-test", tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_every_answer_is_one_token_and_round_trips(t5_tok, name: str) -> None:
    for label in task_labels(name):
        ids = t5_tok(label).input_ids
        assert len(ids) == 2 and ids[-1] == t5_tok.eos_token_id, (label, ids)
        assert t5_tok.decode(ids, skip_special_tokens=True) == label
        # the same token as where the word sits inside a prompt
        assert t5_tok(f"Input: a {label} b").input_ids.count(ids[0]) == 1


def test_prompts_round_trip_without_unknowns(t5_tok) -> None:
    texts = [make_demo_task(n, n_train=5, n_val=0, n_test=0).train[0].source for n in DEMO_TASKS]
    texts.append("Definition: Given a premise, say whether it entails the hypothesis.\n\nNow complete "
                 "the following example -\nInput: Ünïcode — “quotes”, emoji ✓, 中文 and tabs\t!\nOutput: ")
    for text in texts:
        ids = t5_tok(text).input_ids
        assert t5_tok.unk_token_id not in ids
        assert t5_tok.decode(ids, skip_special_tokens=True) == text


def test_prompt_template_pieces_are_single_tokens(t5_tok) -> None:
    source = make_demo_task("demo_colour", n_train=1, n_val=0, n_test=0).train[0].source
    tokens = t5_tok.convert_ids_to_tokens(t5_tok(source).input_ids)
    for piece in PROMPT_PIECES:
        assert tokens.count(piece) == 1, piece
    assert tokens[-2:] == [PROMPT_PIECES[-1], t5_tok.eos_token]


def test_vocab_size_and_special_ids(t5_tok) -> None:
    assert 4000 <= len(t5_tok) <= 8000
    assert (t5_tok.pad_token_id, t5_tok.eos_token_id, t5_tok.unk_token_id) == (0, 1, 2)
    for word in pretrain_words(PRESETS["t5-demo"].pretrain_words):
        assert len(t5_tok(word, add_special_tokens=False).input_ids) == 1


def test_llama_tokenizer_prepends_bos() -> None:
    tok = build_tokenizer("llama")
    ids = tok("red").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 2
    assert tok("red", add_special_tokens=False).input_ids == ids[1:]


def test_tokenizer_training_is_deterministic(t5_tok) -> None:
    again = build_tokenizer("t5")
    assert again.get_vocab() == t5_tok.get_vocab()


def test_pretraining_data_is_disjoint_from_demo() -> None:
    demo_words = set(demo_vocabulary()["words"]) | set(demo_vocabulary()["answers"])
    assert not set(pretrain_words(2000)) & demo_words
    instructions = {task_instruction(n) for n in DEMO_TASKS}
    assert not instructions & set(tiny._PRETRAIN_INSTRUCTIONS)
    prompt, answer = tiny._pretrain_example(random.Random(0), pretrain_words(100))
    assert answer in prompt and set(answer.split()) <= set(pretrain_words(100))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic_and_cached(tmp_path: Path, t5_dir: Path, monkeypatch) -> None:
    other = build_tiny_backbone("t5-test", tmp_path / "elsewhere")
    assert other != t5_dir and other.name == t5_dir.name
    a, b = _weights(t5_dir), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (t5_dir / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()

    def fail(*_args, **_kwargs):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(tiny, "_build_into", fail)
    assert build_tiny_backbone("t5-test", t5_dir.parent) == t5_dir
    with pytest.raises(AssertionError):  # a different spec is a different directory
        build_tiny_backbone(with_overrides("t5-test", seed=1), t5_dir.parent)
    assert not [p for p in t5_dir.parent.iterdir() if p.name.startswith(".t5-test") and p.is_dir()]


DAMAGE = {
    "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
    "a flipped byte": lambda d: (d / "model.safetensors").write_bytes(
        (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:])((d / "model.safetensors").read_bytes())),
    "garbage tokenizer": lambda d: (d / "tokenizer.json").write_text("garbage{{"),
    "config.json deleted": lambda d: (d / "config.json").unlink(),
    "tiny_spec.json deleted": lambda d: (d / "tiny_spec.json").unlink(),
    "no checksums (an older build)": lambda d: (d / "tiny_spec.json").write_text('{"builder": "1"}'),
}


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path, t5_dir: Path) -> None:
    """A cached backbone whose files changed since the build (truncated, edited, deleted) is rebuilt,
    never loaded as a wrong model nor left to fail inside from_pretrained."""
    import shutil

    entry = tmp_path / t5_dir.name
    shutil.copytree(t5_dir, entry)
    for damage in DAMAGE.values():
        damage(entry)
        assert build_tiny_backbone("t5-test", tmp_path) == entry
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (entry / name).read_bytes() == (t5_dir / name).read_bytes(), name
    assert set(json.loads((entry / "tiny_spec.json").read_text())["sha256"]) == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_an_empty_cache_setting_means_the_default_not_the_working_directory(monkeypatch, tmp_path) -> None:
    from gainlora.model.cache import cache_root

    monkeypatch.setenv("GAINLORA_CACHE", str(tmp_path / "c"))
    assert cache_root("") == cache_root(None) == tmp_path / "c"
    monkeypatch.setenv("GAINLORA_CACHE", "")
    assert cache_root("") == Path.home() / ".cache" / "gainlora"


def test_seed_changes_weights(tmp_path: Path, t5_dir: Path) -> None:
    other = build_tiny_backbone(with_overrides("t5-test", seed=1), tmp_path)
    assert other.name != t5_dir.name
    assert not torch.equal(_weights(t5_dir)["shared.weight"], _weights(other)["shared.weight"])


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_backbone("llama-test", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    real = tiny._build_into

    def counting(spec, out):
        calls.append(out)
        real(spec, out)

    monkeypatch.setattr(tiny, "_build_into", counting)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_tiny_backbone("llama-test", tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and len(calls) == 1
    assert (results[0] / "model.safetensors").is_file()


def test_t5_dir_loads_and_generates(t5_dir: Path) -> None:
    assert (t5_dir / "model.safetensors").is_file()
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    tok = AutoTokenizer.from_pretrained(t5_dir)
    assert model.config.vocab_size == len(tok) and model.config.decoder_start_token_id == tok.pad_token_id
    assert tok("red").input_ids == build_tokenizer("t5")("red").input_ids
    batch = tok([e.source for e in make_demo_task("demo_colour", n_train=2, n_val=0, n_test=0).train],
                padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and len(tok.batch_decode(out, skip_special_tokens=True)) == 2


def test_llama_dir_loads(tmp_path: Path) -> None:
    path = build_tiny_backbone("llama-test", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
    ids = tok(["Definition: x\n\nNow complete the following example -\nInput: red\nOutput: "],
              return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tok)


@pytest.mark.parametrize("preset", ["t5-test", "llama-test"])
def test_pretraining_runs_and_changes_weights(tmp_path: Path, preset: str) -> None:
    plain = build_tiny_backbone(preset, tmp_path)
    trained = build_tiny_backbone(with_overrides(preset, pretrain_steps=2, pretrain_batch=4), tmp_path)
    a, b = _weights(plain), _weights(trained)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_shared_loop_follows_its_schedule() -> None:
    # The copying pre-training warms up, then holds; the text pre-training warms up, then decays to a floor.
    held = [lr_factor(s, warmup=4, steps=20, decay_to=None) for s in range(20)]
    assert held[:4] == [0.25, 0.5, 0.75, 1.0] and set(held[4:]) == {1.0}
    decayed = [lr_factor(s, warmup=4, steps=20, decay_to=0.1) for s in range(40)]
    assert decayed[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(decayed[4:], decayed[5:])) and decayed[19] < 0.2 and set(decayed[24:]) == {0.1}


class _Regression(torch.nn.Module):
    """The smallest model with the ``model(**batch).loss`` interface of a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return type("Output", (), {"loss": (self.layer(x).squeeze(-1) - y).pow(2).mean()})


def test_the_shared_loop_trains_any_model_and_leaves_it_in_eval_mode() -> None:
    torch.manual_seed(0)
    model, x = _Regression(), torch.randn(16, 3)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5])}
    first = model(**batch).loss.item()
    stats = train_steps(model, lambda: batch, steps=60, lr=0.1, warmup=5, decay_to=0.1, desc="regression")
    assert model(**batch).loss.item() < first / 10 and not model.training
    assert stats["pretrain_final_loss"] > 0 and stats["pretrain_cpu_seconds"] >= 0


def test_causal_pretraining_batch_masks_the_prompt() -> None:
    tok = build_tokenizer("llama")
    batch = tiny._pretrain_batch(random.Random(0), pretrain_words(50), tok, "llama", 3)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        answer = labels[labels != -100]
        assert answer[-1] == tok.eos_token_id and len(answer) >= 2
        n = int(mask.sum())
        assert torch.equal(ids[n - len(answer) : n], answer)  # labels sit on the answer tokens
        assert ids[0] == tok.bos_token_id


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="t5-demo"):
        build_tiny_backbone("nope")
