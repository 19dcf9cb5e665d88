"""The public reference implementation's tensors, loaded into this project's model, give its outputs.

tests/data/fidelity (its README gives the provenance and the name mapping) holds a tiny two-task
GainLoRA T5 as the reference code built it, one batch of inputs, and the gate coefficients and logits it
produced. Loaded with ``pool: padded_mean``, our forward pass must reproduce both: the strongest
evidence that it is the paper's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5Config, T5ForConditionalGeneration

from gainlora.model.backbone import Backbone
from gainlora.model.module import ContinualLM

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "fidelity" / "ref_2task_tiny_t5"
REFERENCE_ONLY = ("lora_q.", "lora_v.", "previous_lora_weights_", "trans_input", "prompt_key", "prompts_keys")


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict]:
    """Committed with the tests, so this never skips: a missing file is a broken checkout."""
    tensors = load_file(str(REFERENCE.with_suffix(".safetensors")))
    return tensors, json.loads(REFERENCE.with_suffix(".json").read_text())


def reference_branch(tensors: dict[str, torch.Tensor], layer: str, previous: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of our adapted layer ``...Attention.q`` from the reference's names (README)."""
    attention, proj = layer.rsplit(".", 1)
    stem = f"{attention}.previous_lora_weights_{proj}.0" if previous else f"{attention}.lora_{proj}"
    return tensors[f"{stem}.lora_A"], tensors[f"{stem}.lora_B"]


def build_model(tensors: dict[str, torch.Tensor], meta: dict, tokenizer) -> ContinualLM:
    config = T5Config(**{k: v for k, v in meta["config"].items() if k not in ("transformers_version", "_name_or_path")})
    model = T5ForConditionalGeneration(config)
    base = {k: v for k, v in tensors.items() if not k.startswith("__") and not any(s in k for s in REFERENCE_ONLY)}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.requires_grad_(False).eval()
    settings = meta["prompt_config"]
    module = ContinualLM(Backbone(model=model, tokenizer=tokenizer, kind="seq2seq"),
                         rank=settings["lora_r"], alpha=settings["lora_alpha"],
                         gates={"hidden": settings["mlp_hidden_dim"], "pool": "padded_mean"})
    # Our task 0 = the reference's previous task; our task 1 = its current task.
    for previous in (True, False):
        module.add_branch({name: reference_branch(tensors, name, previous) for name in module.adapted})
    module.gates.add_gate(copy_previous=False, G1=tensors["encoder.previous_trans_input.input_linear"][0],
                          G2=tensors["encoder.previous_trans_input.output_linear"][0],
                          key=tensors["encoder.previous_prompts_keys"][0])
    module.gates.add_gate(copy_previous=False, G1=tensors["encoder.trans_input.0.weight"],
                          G2=tensors["encoder.trans_input.2.weight"], key=tensors["encoder.prompt_key"][0])
    return module.eval()


def test_reference_gates_and_logits(reference, t5_backbone) -> None:
    tensors, meta = reference
    module = build_model(tensors, meta, t5_backbone().tokenizer)
    assert module.num_branches == 2 and module.gates.num_gates == 2
    mask = tensors["__attention_mask"]
    batch = {"input_ids": tensors["__input_ids"], "attention_mask": mask, "gate_mask": mask}
    with torch.no_grad():
        coeffs = module.gate_coefficients(batch)
        # Reference column 0 is the current task (our task 1), column 1 the previous one (our task 0).
        torch.testing.assert_close(coeffs.flip(1), tensors["__gates"], rtol=0, atol=2e-6)
        with module.gated(batch):
            logits = module.backbone(input_ids=batch["input_ids"], attention_mask=mask,
                                     decoder_input_ids=tensors["__decoder_input_ids"]).logits
    torch.testing.assert_close(logits, tensors["__logits"], rtol=0, atol=1e-5)


def test_reference_needs_the_reference_pooling(reference, t5_backbone) -> None:
    """The stored batch has padded rows, so the project's default pooling must give other gates."""
    tensors, meta = reference
    module = build_model(tensors, meta, t5_backbone().tokenizer)
    module.gate_pool = "mean"
    mask = tensors["__attention_mask"]
    with torch.no_grad():
        coeffs = module.gate_coefficients({"input_ids": tensors["__input_ids"], "gate_mask": mask}).flip(1)
    padded = (mask == 0).any(1)
    assert (coeffs[padded] - tensors["__gates"][padded]).abs().max() > 1e-3
    torch.testing.assert_close(coeffs[~padded], tensors["__gates"][~padded], rtol=0, atol=2e-6)
