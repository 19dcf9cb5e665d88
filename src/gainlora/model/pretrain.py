"""A tiny T5 pre-trained on a benchmark's own training text, built locally and cached.

A frozen random-init tiny T5 learns synthetic closed-label tasks through LoRA, but not real text
classification: its token embeddings carry no meaning, so a rank-8 branch over 128 random
dimensions cannot tell "great" from "awful". Two label-free steps on the *inputs* of the
benchmark's train.json files (never a label, never a dev/test file) fix that on a CPU: token
embeddings initialised from the corpus's document co-occurrence (LSA: a truncated SVD of the
TF-IDF document x token matrix, seconds), then a short T5 span-corruption pre-training of the
whole model (README, "Real data on a CPU").

``build_text_backbone("t5-text", corpus)`` returns a directory that ``from_pretrained`` loads, like
``gainlora.model.tiny.build_tiny_backbone``, and is cached the same way (``gainlora.model.cache``: same
lock, atomic rename, checksums) under a name that hashes the spec, the bytes of every corpus file and
``TEXT_BUILDER_VERSION``.
The tokenizer is a byte-level BPE trained on the same text, with T5's sentinel tokens.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from gainlora.data.benchmarks import GROUPS, task_dir
from gainlora.data.types import DataError
from gainlora.model.cache import cache_root, cached_build
from gainlora.model.tiny import BOS, EOS, PAD, UNK, TinySpec, _deterministic, train_steps
from gainlora.model.tiny_models import make_model

__all__ = ["TEXT_BUILDER_VERSION", "TEXT_PRESETS", "TextCorpus", "TextSpec", "build_text_backbone", "corpus_texts"]

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the spec does not show (objective, tokenizer training).
TEXT_BUILDER_VERSION = "2"
SENTINELS = 32  # <extra_id_0> .. <extra_id_31>, as T5's span corruption uses them


@dataclass(frozen=True)
class TextSpec:
    """Shape of the tiny T5 and its pre-training recipe."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    d_ff: int = 512
    vocab_size: int = 8000
    pretrain_steps: int = 800
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 32
    pretrain_warmup: int = 100
    max_length: int = 64  # tokens of text per pre-training example (a random window of longer texts)
    noise_density: float = 0.15  # share of tokens masked, in spans of mean length ``mean_span``
    mean_span: float = 3.0
    lsa_init: bool = True  # token embeddings start from the corpus's document co-occurrence (LSA)
    seed: int = 0
    name: str = "t5-text"  # cache directory prefix only; not part of the hash

    def tiny_spec(self) -> TinySpec:
        return TinySpec("t5", d_model=self.d_model, layers=self.layers, heads=self.heads, d_ff=self.d_ff,
                        vocab_size=self.vocab_size, seed=self.seed, name=self.name)


TEXT_PRESETS: dict[str, TextSpec] = {
    # The cpu_long experiment's backbone: the demo's T5 shape (d_model 128, 2+2 layers).
    "t5-text": TextSpec(),
}


@dataclass(frozen=True)
class TextCorpus:
    """The training text: the ``input`` of every instance of ``<data_dir>/<group>/<task>/train.json``."""

    data_dir: str
    benchmark: str  # "long" or "superni" (or the folder names Long_Sequence / SuperNI)
    tasks: tuple[str, ...]

    @classmethod
    def from_config(cls, spec: Mapping) -> TextCorpus:
        """From ``backbone.text_corpus`` ({data_dir, benchmark, tasks}); a DataError names the bad key."""
        missing = [k for k in ("data_dir", "benchmark", "tasks") if not spec.get(k)]
        if missing:
            raise DataError(f"backbone.text_corpus.{missing[0]} is not set: needs data_dir, benchmark and a "
                            "list of tasks whose train.json text pre-trains the backbone")
        tasks = spec["tasks"]
        if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
            raise DataError(f"backbone.text_corpus.tasks={tasks!r}: a list of task names")
        group = spec["benchmark"]
        if group not in GROUPS and group not in GROUPS.values():
            raise DataError(f"backbone.text_corpus.benchmark={group!r}: one of {', '.join(GROUPS)}")
        return cls(str(spec["data_dir"]), str(group), tuple(tasks))

    def files(self) -> list[Path]:
        paths = []
        for task in self.tasks:
            path = task_dir(self.data_dir, self.benchmark, task) / "train.json"
            if not path.is_file():
                raise DataError(f"backbone.text_corpus: {path} is missing (only train.json files are read)")
            paths.append(path)
        return paths

    def digest(self) -> str:
        """Hash of the files' bytes, not their paths: another copy of the same data reuses the cache."""
        h = hashlib.sha256()
        for path in self.files():
            h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()[:16]


def corpus_texts(corpus: TextCorpus) -> list[str]:
    """Every instance's input text, in file order; outputs (labels) are never read."""
    texts = []
    for path in corpus.files():
        try:
            instances = json.loads(path.read_text(encoding="utf-8"))["Instances"]
            texts += [inst["input"].strip() for inst in instances]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"backbone.text_corpus: {path}: not a task file with Instances/input ({err})") from None
    return [t for t in texts if t]


# --- tokenizer ------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the corpus, T5 style (``</s>`` appended), with sentinel tokens for masking."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    sentinels = [f"<extra_id_{i}>" for i in range(SENTINELS)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[PAD, EOS, UNK, BOS, *sentinels],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   bos_token=BOS, additional_special_tokens=sentinels,
                                   clean_up_tokenization_spaces=False, padding_side="right")


# --- embeddings from co-occurrence ---------------------------------------------------------------
def lsa_embeddings(encoded: list[list[int]], vocab: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token vectors from a truncated SVD of the TF-IDF document x token matrix (LSA), and which
    tokens occur at all. Tokens of one review or one news story share directions, so topic and
    sentiment words start out clustered, which 800 steps of span corruption alone do not achieve
    (measured: agnews 34% right after learning it, against a 26% majority class)."""
    rows, cols, vals = [], [], []
    df = torch.zeros(vocab)
    for d, ids in enumerate(encoded):
        tokens, counts = torch.tensor(ids).unique(return_counts=True)
        rows.append(torch.full_like(tokens, d))
        cols.append(tokens)
        vals.append(1 + counts.float().log())  # sublinear term frequency
        df[tokens] += 1
    idf = torch.log(len(encoded) / (1 + df))
    col = torch.cat(cols)
    matrix = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), col]), torch.cat(vals) * idf[col],
                                     (len(encoded), vocab), check_invariants=True).coalesce()
    with torch.random.fork_rng(devices=[]):  # the randomized SVD is seeded; the caller's RNG is untouched
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(matrix, q=dim + 1, niter=4)
    vectors = (v * s)[:, 1:]  # the first component follows token frequency, not meaning
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-8) * dim ** 0.5  # T5-init scale
    return vectors, df > 0


# --- span corruption ------------------------------------------------------------------------------
def corrupt(ids: list[int], rng: random.Random, density: float, mean_span: float,
            sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """T5's objective: masked spans become one sentinel each in the source; the target lists them."""
    n = len(ids)
    n_noise = max(1, round(n * density))
    n_spans = max(1, min(round(n_noise / mean_span), len(sentinels), n - n_noise))
    starts = sorted(rng.sample(range(n - n_noise + 1), n_spans))  # noise-free positions, then spread
    lengths = _split(n_noise, n_spans, rng)
    source, target, pos = [], [], 0
    for k, (start, length) in enumerate(zip(starts, lengths)):
        begin = start + sum(lengths[:k])  # shift past the spans already placed
        source += ids[pos:begin] + [sentinels[k]]
        target += [sentinels[k]] + ids[begin:begin + length]
        pos = begin + length
    return source + ids[pos:] + [eos], target + [eos]


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """``total`` split into ``parts`` positive lengths, uniformly at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _batch(encoded: list[list[int]], rng: random.Random, spec: TextSpec, tokenizer: PreTrainedTokenizerFast,
           sentinels: list[int]) -> dict[str, torch.Tensor]:
    rows = []
    for _ in range(spec.pretrain_batch):
        ids = rng.choice(encoded)
        if len(ids) > spec.max_length:
            start = rng.randrange(len(ids) - spec.max_length + 1)
            ids = ids[start:start + spec.max_length]
        rows.append(corrupt(ids, rng, spec.noise_density, spec.mean_span, sentinels, tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id
    src_w, tgt_w = max(len(s) for s, _ in rows), max(len(t) for _, t in rows)
    input_ids = torch.tensor([s + [pad] * (src_w - len(s)) for s, _ in rows])
    labels = torch.tensor([t + [-100] * (tgt_w - len(t)) for _, t in rows])
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(), "labels": labels}


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, texts: list[str],
              spec: TextSpec) -> dict[str, float]:
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(ids) >= 4]
    if spec.lsa_init:
        embeddings = model.get_input_embeddings().weight
        vectors, seen = lsa_embeddings(encoded, embeddings.shape[0], spec.d_model, spec.seed)
        with torch.no_grad():
            embeddings[seen] = vectors[seen]  # tokens never seen (special, sentinels) keep their init
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(SENTINELS)])
    rng = random.Random(f"text-pretrain:{spec.seed}")
    stats = train_steps(model, lambda: _batch(encoded, rng, spec, tokenizer, sentinels), steps=spec.pretrain_steps,
                        lr=spec.pretrain_lr, warmup=spec.pretrain_warmup, weight_decay=0.01, decay_to=0.1,
                        desc=f"pre-training {spec.name} on benchmark text")
    return {**stats, "corpus_texts": len(encoded)}


# --- build + cache --------------------------------------------------------------------------------
def resolve_text_spec(preset: str | TextSpec, overrides: Mapping | None = None) -> TextSpec:
    if isinstance(preset, TextSpec):
        spec = preset
    elif preset in TEXT_PRESETS:
        spec = TEXT_PRESETS[preset]
    else:
        raise DataError(f"backbone.tiny={preset!r}: with backbone.text_corpus one of {', '.join(TEXT_PRESETS)}")
    unknown = sorted(set(overrides or {}) - {f.name for f in fields(TextSpec)})
    if unknown:
        raise DataError(f"backbone.tiny_overrides.{unknown[0]}: not a field of the text preset; "
                        f"valid: {', '.join(f.name for f in fields(TextSpec))}")
    return replace(spec, **dict(overrides or {}))


def text_backbone_dir(spec: TextSpec, corpus: TextCorpus, root: Path) -> Path:
    fields_ = {k: v for k, v in asdict(spec).items() if k != "name"}
    blob = json.dumps({"spec": fields_, "builder": TEXT_BUILDER_VERSION, "corpus": corpus.digest()}, sort_keys=True)
    return root / f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def build_text_backbone(preset: str | TextSpec, corpus: TextCorpus | Mapping, cache_dir: str | Path | None = None,
                        overrides: Mapping | None = None) -> Path:
    """Build (or reuse) the pre-trained tiny T5 and return the directory ``from_pretrained`` loads."""
    spec = resolve_text_spec(preset, overrides)
    corpus = corpus if isinstance(corpus, TextCorpus) else TextCorpus.from_config(corpus)
    return cached_build(text_backbone_dir(spec, corpus, cache_root(cache_dir)), functools.partial(_build, spec, corpus))


def _build(spec: TextSpec, corpus: TextCorpus, tmp: Path) -> None:
    log.info("building %s into %s (pre-training on the train text of %s)", spec.name, tmp, ", ".join(corpus.tasks))
    texts = corpus_texts(corpus)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    with _deterministic(spec.seed):
        model = make_model(spec.tiny_spec(), tokenizer)
        stats = _pretrain(model, tokenizer, texts, spec)  # LSA init even at 0 steps
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    meta = {"spec": asdict(spec), "builder": TEXT_BUILDER_VERSION, "corpus": asdict(corpus),
            "corpus_digest": corpus.digest(), **stats}
    (tmp / "tiny_spec.json").write_text(json.dumps(meta, indent=2) + "\n")
