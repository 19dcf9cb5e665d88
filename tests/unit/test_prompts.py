"""Soft prompts (model/prompts.py) and the two prompt methods, L2P and LFPT5, on known tensors and tiny
backbones: prompt insertion, L2P's selection and key-pull term, batched generation with prompts equal
to one-at-a-time generation, LFPT5's pseudo-samples (labelled, mixed in) and its KL term."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.types import Example, TaskData
from gainlora.export import main as export_main
from gainlora.methods.l2p import L2P
from gainlora.methods.lfpt5 import LFPT5, distillation_kl, lm_example, parse_pseudo, pseudo_task
from gainlora.model.module import ContinualLM
from gainlora.model.features import frozen_pooled
from gainlora.model.prompts import insert_prompts, select_prompts
from gainlora.targets import ConfigError, bind_method


def test_prompts_go_after_left_padding_and_before_a_right_padded_row() -> None:
    embeds = torch.arange(1, 5, dtype=torch.float32).view(1, 4, 1).repeat(2, 1, 1)  # tokens 1 2 3 4
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])  # left-padded row, right-padded row
    labels = torch.tensor([[-100, -100, 7, 8], [5, 6, 7, -100]])
    prompts = torch.tensor([[[10.0], [20.0]], [[30.0], [40.0]]])
    out, new_mask, extra = insert_prompts(embeds, mask, prompts, {"labels": (labels, -100)})
    assert out[..., 0].tolist() == [[1, 2, 10, 20, 3, 4], [30, 40, 1, 2, 3, 4]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert extra["labels"].tolist() == [[-100, -100, -100, -100, 7, 8], [-100, -100, 5, 6, 7, -100]]


def test_selection_and_pull_on_known_tensors() -> None:
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    query = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    idx, sims = select_prompts(query, keys, top_n=2)
    # cosines: row 0 -> 1, 0, -1, 1/sqrt2; row 1 -> 0, -1, 0, -1/sqrt2 (ties keep the lower index)
    assert idx[0].tolist() == [0, 3] and sorted(idx[1].tolist()) == [0, 2]
    pull = (1 - sims).sum(1).mean()
    torch.testing.assert_close(pull, torch.tensor(((0 + (1 - 1 / math.sqrt(2))) + (1 + 1)) / 2))


def l2p_model(backbone, **kwargs) -> tuple[ContinualLM, L2P]:
    module = ContinualLM(backbone)
    method = L2P(**kwargs)
    method.setup(module, 2)
    return module, method


def test_l2p_selects_by_the_frozen_query_and_adds_the_pull_term(t5_backbone) -> None:
    module, method = l2p_model(t5_backbone(), pool_size=4, prompt_length=2, top_n=1, lam=0.5)
    collator = Collator(module.tokenizer, module.kind)
    batch = collator.train_batch([Example("red apple", "fruit", ("fruit",)), Example("blue sea", "water", ("water",))])
    query = frozen_pooled(module, batch).float()
    with torch.no_grad():  # key 2 is the first example's query, key 0 the second's
        method.pool.keys[2] = query[0]
        method.pool.keys[0] = query[1]
    module.train()
    loss = module(batch)
    assert method.pool.last_selection.tolist() == [[2], [0]]
    reg = method.regularizer(module)
    torch.testing.assert_close(reg, torch.tensor(0.0), atol=1e-6, rtol=0)  # selected keys equal the queries
    with torch.no_grad():
        method.pool.keys[2] = -query[0] + 0.1 * query[1]  # key 2 no longer the best for example 1
    module(batch)
    cos = torch.nn.functional.cosine_similarity(query, method.pool.keys[method.pool.last_selection[:, 0]].detach())
    torch.testing.assert_close(method.regularizer(module), 0.5 * (1 - cos).mean())
    loss.backward()
    assert method.pool.prompts_.grad is not None and method.pool.prompts_.grad[[0, 2]].abs().sum() > 0
    assert method.pool.prompts_.grad[[1, 3]].abs().sum() == 0  # prompts not selected get no gradient
    assert L2P(lam=0.0).regularizer(module) is None


@pytest.mark.parametrize("target, values, message", [
    ("l2p.L2P", {"top_n": 11}, r"method.top_n=11: at most pool_size \(10\)"),
    ("l2p.L2P", {"top_n": 10, "prompt_length": 100}, r"method.top_n=10: top_n x prompt_length at most 512"),
    ("l2p.L2P", {"pool_size": 5000}, r"method.pool_size=5000: should be less than or equal to 1024"),
    ("lfpt5.LFPT5", {"prompt_length": 100000}, r"method.prompt_length=100000: should be less than or equal to 512"),
])
def test_prompt_sizes_are_refused_with_the_config(target: str, values: dict, message: str) -> None:
    """Sizes past these bounds died allocating tens of GB (prompt_length=100000 on a tiny LLaMA)."""
    with pytest.raises(ConfigError, match=message):
        bind_method("method", {"_target_": f"gainlora.methods.{target}", **values})


def generation_scores(module: ContinualLM, batch: dict) -> torch.Tensor:
    """Every step's next-token scores (batch x steps x vocab) of greedy generation with the prompts."""
    inputs = {k: v for k, v in module.prompted_inputs(batch).items() if v is not None}
    out = module.backbone.generate(**inputs, do_sample=False, max_new_tokens=4, return_dict_in_generate=True,
                                   output_scores=True, pad_token_id=module.tokenizer.pad_token_id)
    return torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("method_cls", [L2P, LFPT5])
def test_batched_generation_with_prompts_equals_one_at_a_time(family, method_cls, t5_backbone, llama_backbone) -> None:
    backbone = (t5_backbone if family == "t5" else llama_backbone)()
    module = ContinualLM(backbone, generation={"max_new_tokens": 4})
    method = method_cls(pool_size=4, prompt_length=3, top_n=2) if method_cls is L2P else method_cls(prompt_length=7)
    collator = Collator(module.tokenizer, module.kind)
    sources = ["a b c d e f g", "red", "one two three", "x y"]  # unequal lengths: padded in a batch
    items = [(0, Example(s, "", ("",)), "exact_match") for s in sources]
    module.eval()
    plain = generation_scores(module, collator.eval_batch(items))
    method.setup(module, 1)
    batch = collator.eval_batch(items)
    scores = generation_scores(module, batch)
    singles = torch.cat([generation_scores(module, collator.eval_batch([item])) for item in items])
    torch.testing.assert_close(scores, singles, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores, plain, atol=1e-3)  # the prompts are in the input
    # the text the loop scores: from inputs_embeds a decoder-only model returns only the new tokens
    assert module.generate(batch) == [module.generate(collator.eval_batch([item]))[0] for item in items]
    if method_cls is L2P:  # each example selects its own prompts, in the batch as alone
        module.prompter.prompts(module, batch)
        together = module.prompter.last_selection.clone()
        alone = []
        for item in items:
            module.prompter.prompts(module, collator.eval_batch([item]))
            alone.append(module.prompter.last_selection)
        assert torch.equal(together, torch.cat(alone))


# -- LFPT5 -----------------------------------------------------------------------------------------
def test_kl_term_equals_a_hand_value() -> None:
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])  # (1, 3 positions, 2 words)
    teacher = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [0.0, 9.0]]])
    labels = torch.tensor([[4, 4, -100]])  # the third position is not an answer token
    # position 0: p = (1/4, 3/4), q = (1/2, 1/2); position 1: p = (1/2, 1/2), q = softmax(1, 0)
    q1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.5 * math.log(0.5 / q1[0].item()) + 0.5 * math.log(0.5 / q1[1].item())
    torch.testing.assert_close(distillation_kl(student, teacher, labels, causal=False), torch.tensor((kl0 + kl1) / 2))
    # causal: logits at i predict token i + 1, so labels [x, 4, 4] score positions 0 and 1
    torch.testing.assert_close(distillation_kl(student, teacher, torch.tensor([[-100, 4, 4]]), causal=True),
                               torch.tensor((kl0 + kl1) / 2))
    torch.testing.assert_close(distillation_kl(teacher, teacher, labels, causal=False), torch.tensor(0.0))


def test_pseudo_texts_become_labelled_examples() -> None:
    texts = ["__colour__ red apple __ans__ fruit", "no separator here", " __ans__ empty source", "sky __ans__ blue"]
    found = parse_pseudo(texts, 1, "colour")
    assert [(e.source, e.target, pseudo_task(e)) for e in found] == [("red apple", "fruit", 1), ("sky", "blue", 1)]
    assert lm_example("colour", found[0]).target == "red apple __ans__ fruit"
    assert lm_example("colour", found[0]).source == "__colour__"


def demo_stream(n: int = 6) -> list[TaskData]:
    def task(name: str, word: str) -> TaskData:
        train = [Example(f"{name} input {i}", word, (word,)) for i in range(n)]
        return TaskData(name, "exact_match", train, [], train[:2])
    return [task("first", "yes"), task("second", "no"), task("third", "maybe")]


def test_pseudo_samples_are_generated_labelled_and_mixed_in(t5_backbone, monkeypatch) -> None:
    module = ContinualLM(t5_backbone())
    method = LFPT5(prompt_length=4, pseudo_per_task=5, generation_tokens=8)
    method.setup(module, 3)
    datamodule = TaskStreamDataModule(demo_stream(), Collator(module.tokenizer, module.kind), batch_size=4,
                                      eval_batch_size=3)
    # the real sampler: as many texts as asked, the same ones again under the same seed, the run's RNG untouched
    method.open_branch(module, 1)
    state = torch.random.get_rng_state()
    texts = method.generate_texts(module, datamodule, 0)
    assert len(texts) == 5 and texts == method.generate_texts(module, datamodule, 0)
    assert torch.equal(state, torch.random.get_rng_state())
    # what the model samples decides the pseudo-samples: two of three texts per task parse
    fake = {0: ["q0 __ans__ yes", "junk", "r0 __ans__ yes"], 1: ["q1 __ans__ no", "s1 __ans__ no", "junk"]}
    monkeypatch.setattr(method, "generate_texts", lambda model, dm, task: fake[task])
    method.open_branch(module, 2)
    datamodule.set_task(2)
    mixed = method.prepare(module, datamodule)
    assert [(e.source, e.target, pseudo_task(e)) for e in mixed] == [
        ("q0", "yes", 0), ("r0", "yes", 0), ("q1", "no", 1), ("s1", "no", 1)]
    assert len(method.lm) == 6 + 4  # the task's own examples and the pseudo-samples, as LM examples
    assert sorted(e.source for e in method.lm if "q0" in e.target) == ["__first__"]
    datamodule.set_replay(mixed)
    seen = sum(len(b["input_ids"]) for b in datamodule.train_dataloader())
    assert seen == 6 + 4  # every pseudo-sample is in the task's training data
    # the loss terms: lm_lambda * LM loss + kl_weight * KL, the KL zero while prompt = teacher
    module.train()
    module.trainer = None
    monkeypatch.setattr(ContinualLM, "global_step", property(lambda self: 0))
    reg = method.regularizer(module)
    lm_only = LFPT5(prompt_length=4, kl_weight=0.0)
    lm_only.prompt, lm_only.datamodule, lm_only.lm, lm_only.pseudo = method.prompt, datamodule, method.lm, mixed
    lm_only.lm_collator = method.lm_collator
    torch.testing.assert_close(reg, lm_only.regularizer(module))
    with torch.no_grad():
        method.prompt.prompt.add_(torch.randn_like(method.prompt.prompt))
    batch = datamodule.collator.train_batch(mixed[:4])
    assert method.distill(module, batch) > 0


def test_export_says_a_prompt_method_has_no_branches(tmp_path: Path, capsys) -> None:
    from hydra import compose, initialize_config_dir

    from gainlora.run import CONF_DIR, run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo", "debug=cpu_tiny", "backbone=tiny_t5_test", "method=l2p",
                                           "benchmark.num_tasks=1", "benchmark.n_train=8", "benchmark.n_test=2",
                                           "trainer.max_steps=1", f"paths.runs_dir={tmp_path}", "run_id=x"])
    run(cfg)
    assert not (tmp_path / "demo" / "x" / "tasks" / "01-demo_colour" / "branch.safetensors").exists()
    assert export_main([str(tmp_path / "demo" / "x"), str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: run=") and "no PEFT LoRA adapter" in errors[0]


def test_pseudo_samples_reach_the_fit_and_are_cleared_after(t5_backbone, make_trainer, monkeypatch) -> None:
    import lightning as L

    module = ContinualLM(t5_backbone())
    method = LFPT5(prompt_length=4)
    method.setup(module, 3)
    datamodule = TaskStreamDataModule(demo_stream(), Collator(module.tokenizer, module.kind), batch_size=4)
    monkeypatch.setattr(method, "generate_texts", lambda model, dm, task: [f"p{task} __ans__ w{task}"] * 2)
    sizes, regs = [], []

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            sizes.append(len(trainer.train_dataloader.dataset))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            regs.append(method.regularizer(pl_module))

    datamodule.set_task(2)
    module.start_task(2, lambda: method.regularizer(module))
    method.on_task_start(module, 2, datamodule.feature_batches)
    make_trainer(max_steps=1, callbacks=[*method.callbacks(), Record()]).fit(module, datamodule=datamodule)
    assert sizes == [6 + 4]  # the task's 6 examples and 2 pseudo-samples of each earlier task
    assert [pseudo_task(e) for e in method.pseudo] == [0, 0, 1, 1]
    assert datamodule.replay == []  # tests and the next task see the task's own data
    assert regs[0] is not None and regs[0] > 0
