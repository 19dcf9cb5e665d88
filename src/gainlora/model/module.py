"""The LightningModule: a frozen backbone plus the registry of gated LoRA branches and gates."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import lightning as L
import torch
from torch import Tensor

from gainlora import fsdp
from gainlora.data.types import PAD_TASK
from gainlora.dist import distributed, shard, zero3_partitioned
from gainlora.metrics import TaskScores
from gainlora.model.backbone import Backbone, adapted_layers, replace_module
from gainlora.model.features import Features, collect_features
from gainlora.model.gates import GateBank, pool_embeddings
from gainlora.model.lora import BranchContext, GatedLoRALinear
from gainlora.model.loss import global_token_loss
from gainlora.model.prompts import Prompter, insert_prompts
from gainlora.model.task_attention import TaskAttention

# gate_spec["kind"]: GainLoRA's per-task sigmoid gates, or SAPT's softmax attention over task keys
GATE_KINDS = {"gainlora": GateBank, "attention": TaskAttention}


class ContinualLM(L.LightningModule):
    """Backbone + branch/gate registry. One instance lives for the whole task sequence.

    The continual loop opens branches and gates through the method (``gainlora.methods``) and
    calls ``fit``/``test`` with a fresh Trainer per task.
    """

    def __init__(self, backbone: Backbone, *, rank: int = 8, alpha: float = 32.0, dropout: float = 0.0,
                 gates: dict | None = None, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 generation: dict | None = None, task_names: list[str] | None = None) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints hold only what trains (on_load_checkpoint checks it)
        self.backbone = backbone.model
        self.tokenizer = backbone.tokenizer
        self.kind = backbone.kind
        self.context = BranchContext()
        self.adapted: dict[str, GatedLoRALinear] = {}
        for name, (linear, stream) in adapted_layers(self.backbone, self.kind).items():
            layer = GatedLoRALinear(linear, rank=rank, alpha=alpha, context=self.context, stream=stream,
                                    dropout=dropout)
            replace_module(self.backbone, name, layer)
            self.adapted[name] = layer
        gates = dict(gates) if gates is not None else None  # None: gate-free (every coefficient 1)
        self.gate_pool = gates.pop("pool", "mean") if gates else "mean"
        gate_cls = GATE_KINDS[gates.pop("kind", "gainlora")] if gates is not None else None
        self.gates = gate_cls(backbone.d_model, **gates) if gate_cls is not None else None
        self.optimizer_factory = optimizer
        self.generation = {"max_new_tokens": 50, "num_beams": 1, **(generation or {})}
        self.task_names = list(task_names or [])
        self.current_task = -1
        self.scores = TaskScores(max(len(self.task_names), 1))
        self.predictions: list[dict] = []  # every prediction of the last test, for predictions.json
        self.prompter: Prompter | None = None  # soft prompts (L2P, LFPT5), attached by the method

    def start_task(self, task: int, regularizer: Callable[[], Tensor | None] | None = None) -> None:
        """Called by the loop when task ``task`` begins: the task whose scores count, and the
        method's loss term (None: none)."""
        self.current_task = task
        self.regularizer = regularizer

    # -- branch registry ---------------------------------------------------------------------
    @property
    def num_branches(self) -> int:
        return next(iter(self.adapted.values())).num_branches

    def add_branch(self, init: dict[str, tuple[Tensor | None, Tensor | None]] | None = None) -> None:
        """Freeze every layer's current branch and open a new one (optionally with given A, B)."""
        init = init or {}
        for name, layer in self.adapted.items():
            layer.add_branch(*init.get(name, (None, None)))

    def reset_branch(self) -> None:
        """Discard every layer's current branch and open a fresh one (A kaiming, B zero), as
        ``add_branch`` would: the model is the plain backbone again, plus any frozen branches."""
        for layer in self.adapted.values():
            layer.discard_current()
            layer.add_branch()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- gates -------------------------------------------------------------------------------
    def pooled_embeddings(self, input_ids: Tensor, gate_mask: Tensor) -> Tensor:
        """p0(x): pooled input token embeddings of the source (never the answer)."""
        with torch.no_grad():
            embeds = self.backbone.get_input_embeddings()(input_ids)
        return pool_embeddings(embeds.float(), gate_mask, self.gate_pool)

    # A method's non-learned routing in place of gates (EPI): batch -> (batch x branches) coefficients.
    router: Callable[[dict], Tensor | None] | None = None

    def gate_coefficients(self, batch: dict) -> Tensor | None:
        if self.router is not None:
            return self.router(batch)
        if self.gates is None or self.gates.num_gates == 0:
            return None
        return self.gates(self.pooled_embeddings(batch["input_ids"], batch["gate_mask"]))

    def gated(self, batch: dict) -> AbstractContextManager[None]:
        """Inside the block the backbone weighs each example's branches by its gate coefficients,
        computed once here from the batch's source; outside it every coefficient is 1."""
        return self.context.gating(self.gate_coefficients(batch))

    # -- soft prompts --------------------------------------------------------------------------
    def prompted_inputs(self, batch: dict) -> dict:
        """The backbone's inputs for the batch: ``input_ids`` and ``attention_mask`` (and ``labels``),
        or, with a prompter, ``inputs_embeds`` with the prompts inserted (``gainlora.model.prompts``)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "labels" in batch:
            inputs["labels"] = batch["labels"]
        if self.prompter is None:
            return inputs
        prompts = self.prompter.prompts(self, batch)
        embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        extras = {"labels": (batch["labels"], -100)} if "labels" in batch and self.kind == "causal" else {}
        embeds, mask, extra = insert_prompts(embeds, batch["attention_mask"], prompts, extras)
        return {**inputs, **extra, "input_ids": None, "inputs_embeds": embeds, "attention_mask": mask}

    # -- training ----------------------------------------------------------------------------
    def forward(self, batch: dict) -> Tensor:
        """Teacher-forced loss of a training batch (answer tokens only): its token mean, or with
        ``global_tokens`` its share of the global batch's token mean."""
        with self.gated(batch):
            inputs = self.prompted_inputs(batch)
            if "global_tokens" in batch:  # several devices or accumulation steps: gainlora.model.loss
                return global_token_loss(self.backbone, {**batch, **inputs}, self.kind)
            out = self.backbone(**inputs)
        return out.loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # forward, not self(batch): under ZeRO-3 a nested call of the root module ends with its
        # release of the gathered tensors, before the loss term below reads them
        loss = self.forward(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) in task {self.current_task + 1} at step {self.global_step}; "
                "lower the learning rate or check the data. Finished tasks are kept on disk.")
        total = loss
        reg = self.regularizer() if self.regularizer is not None else None
        if reg is not None:
            total = loss + reg
            self.log("train/reg", reg, prog_bar=False)
        self.log("train/loss", loss, prog_bar=True)
        return total

    regularizer: Callable[[], Tensor | None] | None = None  # set by methods that add a loss term

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """In-task checkpoints hold what trains; the frozen backbone and old branches and gates
        are rebuilt from the run directory on resume."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        saved = set(checkpoint["state_dict"])
        if saved != trainable:
            raise RuntimeError(f"in-task checkpoint does not match the re-opened task: it holds {sorted(saved)[:3]}..., "
                               f"the model trains {sorted(trainable)[:3]}...; delete the task's checkpoints folder "
                               "to restart the task")

    def on_fit_start(self) -> None:
        # The backbone is loaded in eval mode and Lightning keeps submodules' modes (its eval loops
        # restore them), so without this dropout (backbone and LoRA) would be off in training for some
        # methods and on for others (collect_features restores train mode); the reference trains in
        # train mode.
        self.train()

    def configure_model(self) -> None:
        """Under ModelParallelStrategy the frozen backbone's blocks are sharded (gainlora.fsdp)."""
        fsdp.configure_model(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return fsdp.callbacks(self._trainer)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("nothing to train: the method opened no trainable branch or gate")
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
        return self.optimizer_factory(params=params)

    # -- generation and evaluation -------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, **overrides) -> list[str]:
        """Greedy (or beam) generation; gates computed once per example from the source."""
        return self._generate(batch, **overrides)[0]

    def _generate(self, batch: dict, **overrides) -> tuple[list[str], list[int]]:
        """The answers and their lengths in generated tokens. generate() stops once every row of the
        batch has ended (length-sorted evaluation batches make that early)."""
        kwargs = {"do_sample": False, **self.generation, **overrides}
        with self.gated(batch):
            inputs = {k: v for k, v in self.prompted_inputs(batch).items() if v is not None}
            out = self.backbone.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id, **kwargs,
                                         synced_gpus=distributed() and (zero3_partitioned(self.backbone) or fsdp.is_sharded(self)))
        if self.kind == "causal" and "input_ids" in inputs:  # from inputs_embeds only new tokens come back
            out = out[:, batch["input_ids"].shape[1]:]
        lengths = (out != self.tokenizer.pad_token_id).sum(1).tolist()
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)], lengths

    def _score_batch(self, batch: dict) -> None:
        with torch.no_grad():
            preds, lengths = self._generate(batch)
        task_ids = batch["task_id"].tolist()
        real = [i for i, t in enumerate(task_ids) if t != PAD_TASK]  # padding that evens out ranks
        self.scores.update([preds[i] for i in real], [batch["references"][i] for i in real],
                           [task_ids[i] for i in real], [batch["metric"][i] for i in real])
        if not self.trainer.sanity_checking and self.trainer.testing:
            for p, r, t, src, i, n in zip(preds, batch["references"], task_ids, batch["source"], batch["index"],
                                          lengths):
                self.predictions.append({"task": t, "source": src, "prediction": p, "references": list(r),
                                         "index": i, "tokens": n})

    def on_validation_epoch_start(self) -> None:
        self.scores.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score_batch(batch)

    def on_validation_epoch_end(self) -> None:
        # The tasks the fit validates on: the current one, or all seen ones for joint training
        # (tasks without validation examples are nan and left out).
        score = torch.nanmean(self.scores.compute()[: self.current_task + 1])
        self.log("val/score", score, prog_bar=True, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self.scores.reset()
        self.predictions = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score_batch(batch)

    def on_test_epoch_end(self) -> None:
        """Gather every rank's predictions (rank r held items r, r + W, ... of the length-sorted
        schedule), put them back in dataset order, and tell the data module the answers' lengths."""
        world = shard()[1]
        if world > 1:
            shards: list[list[dict]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(shards, self.predictions)
            self.predictions = [p for row in shards for p in row]
        rows = sorted((p for p in self.predictions if p["task"] != PAD_TASK), key=lambda p: (p["task"], p["index"]))
        remember = getattr(self.trainer.datamodule, "remember_answer_lengths", None)
        if remember is not None:
            remember("test", [(p["task"], p["index"], p["tokens"]) for p in rows])
        self.predictions = [{k: p[k] for k in ("task", "source", "prediction", "references")} for p in rows]

    def test_scores(self) -> list[float]:
        """Per-task scores of the last test (tasks 0..current)."""
        return self.scores.compute()[: self.current_task + 1].tolist()

    # -- feature collection (memories, InfLoRA, gate initialisation) ---------------------------
    def collect_features(self, batches: Iterable[dict], *, max_batches: int | None, layers: bool,
                         gate: bool) -> Features:
        """Uncentred covariances of adapted-layer inputs and/or the current gate's layer inputs
        (``gainlora.model.features``)."""
        return collect_features(self, batches, max_batches=max_batches, layers=layers, gate=gate)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
