"""Tiny backbones built locally (no model hub): a byte-level BPE tokenizer and a small T5 or decoder-only
model (Llama, Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, Phi; configs in ``tiny_models``).

``build_tiny_backbone("t5-demo")`` returns a directory that ``AutoModelForSeq2SeqLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load, exactly like a hub checkpoint, so the real loading path is
the one tests and the demo exercise. Builds are cached on disk under a name that hashes the spec, the
tokenizer corpus and ``BUILDER_VERSION`` (a changed recipe rebuilds), written to a temp dir and
renamed into place under a file lock (concurrent builders never see a half-written model), with each
file's sha256 recorded: a cached copy damaged since is rebuilt (``gainlora.model.cache``).

Presets that ask for it get a short generic pre-training of the whole model: repeating random
pseudo-word strings. A frozen random-init model cannot learn to copy an open-vocabulary word with
LoRA alone; after this pre-training it can (docs/demo_findings.md). The pre-training shares no
instruction and no pseudo-word with the demo tasks.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from gainlora.data.demo import PROMPT_PIECES, demo_vocabulary, pseudo_word_universe, render_prompt
from gainlora.model.cache import cache_root, cached_build, default_cache_dir
from gainlora.model.tiny_models import make_model

__all__ = [
    "BUILDER_VERSION",
    "PRESETS",
    "TinySpec",
    "build_tiny_backbone",
    "build_tokenizer",
    "default_cache_dir",
    "lr_factor",
    "pretrain_words",
    "resolve_spec",
    "train_steps",
    "with_overrides",
]

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the spec does not show (corpus, tasks, optimiser, init).
BUILDER_VERSION = "1"

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"  # ids 0..3, T5's convention for the first three


@dataclass(frozen=True)
class TinySpec:
    """Shape and recipe of a tiny backbone. ``layers`` is the encoder (T5) or decoder depth;
    ``arch`` is ``t5`` or a decoder-only family of ``tiny_models.CAUSAL``."""

    arch: str
    d_model: int
    layers: int
    heads: int
    d_ff: int
    decoder_layers: int | None = None  # T5 only; defaults to ``layers``
    vocab_size: int = 6000  # BPE target size
    max_positions: int = 512  # Llama only (T5 uses relative positions)
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 32
    pretrain_warmup: int = 100
    pretrain_words: int = 1000  # size of the pre-training pseudo-word pool
    seed: int = 0
    name: str = "custom"  # cache directory prefix only; not part of the hash

    def digest(self) -> str:
        """Short hash of everything that determines the weights."""
        fields = {k: v for k, v in asdict(self).items() if k != "name"}
        recipe = {"builder": BUILDER_VERSION, "corpus": _corpus_digest(), "lengths": _PRETRAIN_LENGTHS}
        blob = json.dumps({"spec": fields, **recipe}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


PRESETS: dict[str, TinySpec] = {
    # The demo backbone: docs/demo_findings.md's d_model-128, 2+2-layer T5, pre-trained.
    "t5-demo": TinySpec("t5", d_model=128, layers=2, heads=4, d_ff=512, pretrain_steps=2000, name="t5-demo"),
    # Unit tests: random init, builds in seconds.
    "t5-test": TinySpec("t5", d_model=64, layers=2, heads=2, d_ff=128, name="t5-test"),
    "llama-test": TinySpec("llama", d_model=64, layers=2, heads=2, d_ff=128, name="llama-test"),
    # Today's decoder-only families, the same shape as llama-test (tests/unit/test_families.py).
    **{f"{arch}-test": TinySpec(arch, d_model=64, layers=2, heads=2, d_ff=128, name=f"{arch}-test")
       for arch in ("qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "phi")},
    # Decoder-only counterpart of t5-demo, pre-trained the same way in causal-LM format.
    "llama-demo": TinySpec(
        "llama", d_model=128, layers=4, heads=4, d_ff=384, pretrain_steps=2000, name="llama-demo"
    ),
}


def resolve_spec(preset: str | TinySpec) -> TinySpec:
    if isinstance(preset, TinySpec):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown tiny preset {preset!r}; valid: {', '.join(PRESETS)}") from None



# --- tokenizer ------------------------------------------------------------------------------------
# A little generic English so real SuperNI text tokenizes into sensible pieces (bytes cover the rest).
_ENGLISH = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or
had by word but what some we can out other were all there when up use your how said an each she which
do their time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than call first
who may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among task label input output text given classify sentence question answer
definition positive negative true false yes no review topic summary title category premise hypothesis
entailment contradiction neutral sentiment options following example complete generate identify
""".split()


def pretrain_words(n: int) -> tuple[str, ...]:
    """The pre-training pseudo-word pool: the next ``n`` pseudo-words the demo does not use."""
    used = set(demo_vocabulary()["words"])
    return tuple(w for w in pseudo_word_universe() if w not in used)[:n]


_MAX_PRETRAIN_WORDS = 2000  # every spec's pool is a prefix of this, so the tokenizer covers them all


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(single-token words, other text) the tokenizer is trained on; fixed, so BPE is deterministic."""
    vocab = demo_vocabulary()
    single = tuple(sorted({*vocab["answers"], *vocab["words"], *pretrain_words(_MAX_PRETRAIN_WORDS)}))
    texts = (*vocab["texts"], *(render_prompt(i, "") for i in _PRETRAIN_INSTRUCTIONS))
    return single, texts


@lru_cache(maxsize=1)
def _corpus_digest() -> str:
    single, other = _corpus()
    blob = "\n".join((*single, "--", *other, "--", *_ENGLISH))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _corpus_lines() -> Iterator[str]:
    single, other = _corpus()
    # Repeating required words far more often than anything else makes BPE merge each into one token
    # before it spends the budget on English; the assertion in build_tokenizer checks it did.
    for _ in range(40):
        for i in range(0, len(single), 32):
            yield " ".join(single[i : i + 32])
    for _ in range(10):
        yield from other
    for _ in range(3):
        yield " ".join(_ENGLISH)
        yield " ".join(w.capitalize() for w in _ENGLISH)


def build_tokenizer(arch: str = "t5", vocab_size: int = 6000) -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text encodes without unknown tokens; every demo answer is one token.

    T5 style appends ``</s>`` to every encoding; every other arch (Llama style) prepends ``<s>``. A leading space is
    added before pre-tokenization (so "red" alone and " red" inside a sentence are the same token)
    and stripped again when decoding.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, EOS, UNK, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    # The SuperNI template's fixed pieces as whole tokens: ~15 fewer tokens per prompt, which
    # roughly halves the encoder's work on the demo. Ordinary (non-special) tokens, so they decode.
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in PROMPT_PIECES])
    eos_id, bos_id = tok.token_to_id(EOS), tok.token_to_id(BOS)
    if arch == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    single, _ = _corpus()
    split = [w for w in single if len(tok.encode(w, add_special_tokens=False).ids) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits {len(split)} required words, e.g. {split[:5]}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
        padding_side="right" if arch == "t5" else "left",
    )


# --- pre-training ---------------------------------------------------------------------------------
# Copying is the skill a frozen random model lacks (docs/demo_findings.md), so pre-training is copying:
# repeat a random string of 1-8 pseudo-words (the demo's inputs have up to 8 words). Measured: after
# 2,000 steps LoRA learns "copy the last word" to 100% (two seeds); 1,200 steps of 1-6 words gave 84%.
# Mixing in content lookups ("which word follows / precedes X", "fill the blank") stalled learning:
# after 1,500-2,500 steps the model did not even repeat, and LoRA reached 8-13% on the copy task.
# Infilling a random string is pure noise (the hidden words occur nowhere else). Several phrasings
# of the one instruction, none a demo instruction, keep the skill from hinging on exact wording.
_PRETRAIN_INSTRUCTIONS = (
    "Write the same words again in the same order.",
    "Repeat the sequence of words.",
    "Say these words once more, unchanged.",
)
_PRETRAIN_LENGTHS = (1, 8)


def _pretrain_example(rng: random.Random, words: tuple[str, ...]) -> tuple[str, str]:
    """One (prompt, answer) pair: a random pseudo-word string and the same string back."""
    seq = " ".join(rng.choice(words) for _ in range(rng.randint(*_PRETRAIN_LENGTHS)))
    return render_prompt(rng.choice(_PRETRAIN_INSTRUCTIONS), seq), seq


def _pretrain_batch(
    rng: random.Random, words: tuple[str, ...], tokenizer: PreTrainedTokenizerFast, arch: str, size: int
) -> dict[str, torch.Tensor]:
    pairs = [_pretrain_example(rng, words) for _ in range(size)]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    if arch == "t5":
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
        labels = tokenizer(answers, padding=True, return_tensors="pt")
        target = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": target}
    # Causal LM: prompt + answer + EOS, loss on the answer only, right padded.
    rows = []
    for p, a in zip(prompts, answers):
        prompt = tokenizer(p).input_ids
        answer = tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, *, warmup: int, steps: int, decay_to: float | None) -> float:
    """Multiplier of the learning rate at ``step`` (0-based) of ``train_steps``."""
    warmup = max(1, warmup)
    ramp = (step + 1) / warmup
    if decay_to is None:
        return min(1.0, ramp)
    return min(ramp, max(decay_to, 1 - (step - warmup) / max(1, steps - warmup)))


def train_steps(model: PreTrainedModel, next_batch: Callable[[], dict[str, torch.Tensor]], *, steps: int,
                lr: float, warmup: int, weight_decay: float = 0.0, decay_to: float | None = None,
                desc: str) -> dict[str, float]:
    """The one pre-training loop of every tiny backbone (this module's copying, ``gainlora.model.pretrain``'s
    span corruption): AdamW, clipped gradients, linear warm-up over ``warmup`` steps, then a constant
    rate, or with ``decay_to`` a linear decay to that fraction at the last step (a short run ends on
    small steps). Returns wall and CPU seconds and the smoothed final loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=warmup, steps=steps, decay_to=decay_to))
    model.train()
    start, cpu0, ema = time.perf_counter(), time.process_time(), None
    bar = tqdm(range(steps), desc=desc, mininterval=10.0)
    for step in bar:
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    log.info("%s: %d steps in %.0f s (%.0f s CPU), loss %.3f", desc, steps, seconds, cpu,
             float("nan") if ema is None else ema)
    return {"pretrain_seconds": round(seconds, 1), "pretrain_cpu_seconds": round(cpu, 1),
            "pretrain_final_loss": round(float(ema or 0.0), 4)}


def _pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, spec: TinySpec) -> dict[str, float]:
    words = pretrain_words(spec.pretrain_words)
    rng = random.Random(f"pretrain:{spec.seed}")
    return train_steps(model, lambda: _pretrain_batch(rng, words, tokenizer, spec.arch, spec.pretrain_batch),
                       steps=spec.pretrain_steps, lr=spec.pretrain_lr, warmup=spec.pretrain_warmup,
                       desc=f"pre-training {spec.name}")


# --- build + cache --------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch without disturbing the caller's RNG or determinism setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous)


def _build_into(spec: TinySpec, out: Path) -> None:
    log.info("building tiny backbone %s into %s", spec.name, out)
    tokenizer = build_tokenizer(spec.arch, spec.vocab_size)
    with _deterministic(spec.seed):
        model = make_model(spec, tokenizer)
        stats = _pretrain(model, tokenizer, spec) if spec.pretrain_steps > 0 else {}
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    meta = {"spec": asdict(spec), "builder": BUILDER_VERSION, "corpus": _corpus_digest(), **stats}
    (out / "tiny_spec.json").write_text(json.dumps(meta, indent=2) + "\n")


def build_tiny_backbone(preset: str | TinySpec, cache_dir: str | Path | None = None) -> Path:
    """Build (or reuse) a tiny backbone and return the directory ``from_pretrained`` loads."""
    spec = resolve_spec(preset)
    final = cache_root(cache_dir) / f"{spec.name}-{spec.digest()}"
    return cached_build(final, functools.partial(_build_into, spec))


def with_overrides(preset: str | TinySpec, **changes: object) -> TinySpec:
    """A preset with some fields changed, e.g. ``with_overrides("t5-demo", pretrain_steps=0)``."""
    return replace(resolve_spec(preset), **changes)  # type: ignore[arg-type]
