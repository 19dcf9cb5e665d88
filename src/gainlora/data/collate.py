"""Tokenisation into training and evaluation batches, for seq2seq (T5) and causal (LLaMA) models.

Training batches: ``input_ids``, ``attention_mask``, ``labels`` (-100 where no loss), ``gate_mask``
(the source tokens the gates pool over). Evaluation batches carry the source only (left-padded for
causal models so generation continues every row) plus ``task_id``, ``references``, ``metric`` and
``index`` (each row's place in dataset order, as length-sorted evaluation reorders rows).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from gainlora.data.types import DataError, Example

log = logging.getLogger(__name__)
IGNORE = -100


class EvalItem(NamedTuple):
    """One evaluation example, its source tokenized (once per run) and its place in dataset order."""

    task: int
    example: Example
    metric: str
    ids: list[int]
    index: int


@dataclass
class TruncationCounter:
    sources: int = 0
    targets: int = 0
    warned: set = field(default_factory=set)

    def report(self, what: str, count: int, limit: int) -> None:
        if count and what not in self.warned:
            self.warned.add(what)
            log.warning("%s longer than %d tokens are truncated (counted in results.json)", what, limit)


@dataclass
class Collator:
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "seq2seq" | "causal"
    max_source_length: int = 512
    max_target_length: int = 50
    truncation: TruncationCounter = field(default_factory=TruncationCounter)
    # Chat/instruct checkpoints (LLaMA-3-Instruct, Qwen-Instruct, ...): each source becomes one user
    # turn of the tokenizer's chat template, ending with the assistant header the answer follows.
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.chat_template and (self.kind != "causal" or not getattr(self.tokenizer, "chat_template", None)):
            raise DataError(f"backbone.chat_template=true: needs a decoder-only model whose tokenizer has a chat "
                            f"template (this {self.kind} model's tokenizer has none)")

    def _chat_ids(self, content: str) -> list[int]:
        tok = self.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS

    def _chat_sources(self, examples: list[Example]) -> list[list[int]]:
        """Each source as one user turn, tokenized whole as the checkpoint saw it in training.

        Stripped, as LLaMA-3's template trims: "Output: " ends the user turn, the answer is the
        assistant's. Too long: the content is cut (never the turn's markers) and re-rendered.
        """
        limit, rows, long = self.max_source_length, [], 0
        for example in examples:
            content = example.source.strip()
            ids = self._chat_ids(content)
            if len(ids) > limit:
                long += 1
                pieces = self.tokenizer(content, add_special_tokens=False)["input_ids"]
                keep = len(pieces) - (len(ids) - limit)
                while len(ids) > limit and keep > 0:  # re-tokenizing may shift a token or two
                    ids = self._chat_ids(self.tokenizer.decode(pieces[:keep]))
                    keep -= max(len(ids) - limit, 1)
                if len(ids) > limit:
                    raise DataError(f"backbone.max_source_length={limit}: shorter than the chat template's own "
                                    f"{len(self._chat_ids(''))} tokens")
            rows.append(ids)
        self.truncation.sources += long
        self.truncation.report("sources", long, limit)
        return rows

    def _encode(self, texts: list[str], limit: int, what: str) -> list[list[int]]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        long = sum(len(x) > limit for x in ids)
        if what == "sources":
            self.truncation.sources += long
        else:
            self.truncation.targets += long
        self.truncation.report(what, long, limit)
        return [x[:limit] for x in ids]

    def _sources(self, examples: list[Example]) -> list[list[int]]:
        tok = self.tokenizer
        if self.kind == "seq2seq":  # T5 convention: the source ends with EOS
            ids = self._encode([e.source for e in examples], self.max_source_length - 1, "sources")
            return [x + [tok.eos_token_id] for x in ids]
        if self.chat_template:
            return self._chat_sources(examples)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = self._encode([e.source for e in examples], self.max_source_length - len(bos), "sources")
        return [bos + x for x in ids]

    def _targets(self, examples: list[Example]) -> list[list[int]]:
        ids = self._encode([e.target for e in examples], self.max_target_length - 1, "targets")
        return [x + [self.tokenizer.eos_token_id] for x in ids]

    def answer_tokens(self, examples: list[Example]) -> list[int]:
        """Each example's count of trained answer tokens (its labels != -100 in ``train_batch``),
        without touching the truncation counters."""
        ids = self.tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
        return [min(len(x), self.max_target_length - 1) + 1 for x in ids]

    def _pad(self, rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def train_batch(self, examples: list[Example]) -> dict:
        pad = self.tokenizer.pad_token_id
        sources, targets = self._sources(examples), self._targets(examples)
        if self.kind == "seq2seq":
            input_ids = self._pad(sources, pad)
            mask = (self._pad([[1] * len(s) for s in sources], 0))
            return {"input_ids": input_ids, "attention_mask": mask, "gate_mask": mask,
                    "labels": self._pad(targets, IGNORE)}
        rows = [s + t for s, t in zip(sources, targets)]
        labels = [[IGNORE] * len(s) + t for s, t in zip(sources, targets)]
        return {"input_ids": self._pad(rows, pad),
                "attention_mask": self._pad([[1] * len(r) for r in rows], 0),
                "gate_mask": self._pad([[1] * len(s) + [0] * len(t) for s, t in zip(sources, targets)], 0),
                "labels": self._pad(labels, IGNORE)}

    def eval_items(self, items: list[tuple[int, Example, str]], start: int = 0) -> list[EvalItem]:
        """(task index, example, metric name) items with their sources tokenized, indexed from ``start``."""
        sources = self._sources([e for _, e, _ in items])
        return [EvalItem(t, e, m, ids, start + i) for i, ((t, e, m), ids) in enumerate(zip(items, sources))]

    def eval_batch(self, items: list[tuple[int, Example, str]]) -> dict:
        """``items``: (task index, example, metric name)."""
        return self.encoded_eval_batch(self.eval_items(items))

    def encoded_eval_batch(self, items: list[EvalItem]) -> dict:
        """A batch of already tokenized items: padding only."""
        sources = [item.ids for item in items]
        left = self.kind == "causal"
        mask = self._pad([[1] * len(s) for s in sources], 0, left=left)
        return {"input_ids": self._pad(sources, self.tokenizer.pad_token_id, left=left),
                "attention_mask": mask, "gate_mask": mask,
                "task_id": torch.tensor([item.task for item in items], dtype=torch.long),
                "references": [item.example.references for item in items], "metric": [item.metric for item in items],
                "source": [item.example.source for item in items], "index": [item.index for item in items]}
