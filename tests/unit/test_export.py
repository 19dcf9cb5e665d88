"""PEFT export: each branch, and the gate-free sum, loaded with the `peft` package on the plain
Hugging Face backbone, gives this project's logits; the gate sidecar reproduces the coefficients."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from gainlora.export import main as export_main
from gainlora.export import merged_branches, write_peft_adapter
from gainlora.model.backbone import load_backbone
from gainlora.model.module import ContinualLM
from gainlora.model.tiny import build_tiny_backbone

peft = pytest.importorskip("peft")
TOL = 1e-9  # float64 on both sides: the same function, not merely close


def hf_logits(model, kind: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "seq2seq":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def ours(module: ContinualLM, ids: torch.Tensor, coeffs: torch.Tensor | None) -> torch.Tensor:
    module.context.coeffs = coeffs  # None: every branch with coefficient 1, as gate-free methods run
    try:
        return hf_logits(module.backbone, module.kind, ids)
    finally:
        module.context.coeffs = None


def peft_logits(path: Path, kind: str, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(str(path), dtype=torch.float64), str(adapter))
    return hf_logits(model.double().eval(), kind, ids)


@pytest.mark.parametrize("preset", ["t5-test", "llama-test", "phi3-test"])
def test_peft_adapters_give_this_project_s_logits(preset: str, tiny_cache: Path, tmp_path: Path) -> None:
    path = build_tiny_backbone(preset, cache_dir=tiny_cache)
    torch.manual_seed(0)
    module = ContinualLM(load_backbone(str(path)), rank=4, alpha=32)
    for _ in range(3):  # three branches with non-zero A and B
        module.add_branch({name: (None, 0.3 * torch.randn(layer.out_features, layer.rank))
                           for name, layer in module.adapted.items()})
    module.double().eval()
    ids = torch.randint(4, 300, (2, 11))
    scale = next(iter(module.adapted.values())).scale
    auto = AutoModelForSeq2SeqLM if module.kind == "seq2seq" else AutoModelForCausalLM
    plain = hf_logits(auto.from_pretrained(str(path), dtype=torch.float64).eval(), module.kind, ids)
    for i in range(3):
        adapter = write_peft_adapter(tmp_path / f"branch{i}", module,
                                     {n: layer.branch(i) for n, layer in module.adapted.items()}, scale)
        expected = ours(module, ids, F.one_hot(torch.tensor([i, i]), 3).float())
        got = peft_logits(path, module.kind, adapter, ids)
        assert (expected - plain).abs().max() > 1e-2  # the branch does change the output
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    merged = write_peft_adapter(tmp_path / "merged", module, merged_branches(module), scale)
    config = json.loads((merged / "adapter_config.json").read_text())
    fused = preset == "phi3-test"
    assert config["r"] == 3 * 4 * (2 if fused else 1) and config["lora_alpha"] == scale * config["r"]
    torch.testing.assert_close(peft_logits(path, module.kind, merged, ids), ours(module, ids, None), atol=TOL, rtol=0)


def compose_run(tmp_path: Path, method: str, run_id: str):
    from gainlora.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[
            "experiment=demo", "backbone=tiny_t5_test", f"method={method}", "benchmark.num_tasks=2",
            "benchmark.n_train=32", "benchmark.n_test=8", "data.batch_size=16", "trainer.max_steps=3",
            "optimizer.lr=0.05", "trainer.enable_progress_bar=false", f"paths.runs_dir={tmp_path}",
            f"run_id={run_id}", "method.hidden=16" if method.startswith("gainlora") else "seed=0"])


@pytest.mark.slow
def test_export_cli_inclora_run_round_trips(tmp_path: Path, capsys) -> None:
    from gainlora.api import load_run
    from gainlora.run import run

    run(compose_run(tmp_path, "inclora", "inc"))
    run_dir, out = tmp_path / "demo" / "inc", tmp_path / "export"
    assert export_main([str(run_dir), "--format", "peft", str(out)]) == 0
    trained = load_run(run_dir)
    module = trained.module.double()
    path = Path(module.backbone.name_or_path)
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["01-demo_colour", "02-demo_parity"]
    sidecar = json.loads((out / "gainlora.json").read_text())
    assert sidecar["merged"] == "merged" and "gates" not in sidecar
    ids = torch.randint(4, 300, (2, 11))
    for i, folder in enumerate(sorted((out / "tasks").iterdir())):
        expected = ours(module, ids, F.one_hot(torch.tensor([i, i]), 2).float())
        torch.testing.assert_close(peft_logits(path, "seq2seq", folder, ids), expected, atol=TOL, rtol=0)
    merged = peft_logits(path, "seq2seq", out / "merged", ids)
    torch.testing.assert_close(merged, ours(module, ids, None), atol=TOL, rtol=0)
    assert (merged - ours(module, ids, torch.zeros(2, 2))).abs().max() > 1e-3  # the branches trained
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # argparse's check, in the same one-line form
        export_main([str(run_dir), "--format", "onnx", str(tmp_path / "x")])
    assert stopped.value.code == 2
    assert export_main([str(run_dir), str(out)]) == 2  # not empty
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --format=onnx: expected one of peft",
                   f"error: out={out}: exists and is not an empty folder"]


@pytest.mark.parametrize("out", ["run/tasks/x", "run", "link"])
def test_export_refuses_an_out_in_the_run_or_behind_a_link(out: str, tmp_path: Path, capsys) -> None:
    """A run directory has one writer; a dangling link would fail at the first write, after the load."""
    run = tmp_path / "run"
    (run / "tasks").mkdir(parents=True)
    (run / "config.yaml").write_text("benchmark:\n  reader: demo\n")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert export_main([str(run), str(tmp_path / out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert line == [f"error: out={tmp_path / out}: " + ("exists and is not an empty folder" if out != "run/tasks/x"
                                                         else f"inside the run directory {run}; give a folder outside it")]
    assert not (run / "tasks" / "x").exists()


def exported_sidecar(tmp_path: Path, method: str) -> tuple[dict, dict, ContinualLM, dict, torch.Tensor]:
    """Train and export a two-task demo run; its sidecar JSON and gate tensors, the trained module, a
    batch of two prompts and their input embeddings (what the documented formulas start from)."""
    from gainlora.api import load_run
    from gainlora.data.types import Example
    from gainlora.run import run

    run(compose_run(tmp_path, method, "run"))
    run_dir, out = tmp_path / "demo" / "run", tmp_path / "export"
    assert export_main([str(run_dir), str(out)]) == 0
    sidecar = json.loads((out / "gainlora.json").read_text())
    assert sidecar["merged"] is None and not (out / "merged").exists()
    assert set(sidecar["adapters"]) == {"demo_colour", "demo_parity"}
    gates = load_file(str(out / "gainlora" / "gates.safetensors"))
    trained = load_run(run_dir)
    prompts = ["Definition: Name the colour.\n\nNow complete the following example -\nInput: sky\nOutput: ",
               "Definition: Is it even?\n\nNow complete the following example -\nInput: 12\nOutput: "]
    batch = trained.collator.eval_batch([(0, Example(p, "", ("",)), "rougeL") for p in prompts])
    embeds = trained.module.backbone.get_input_embeddings()(batch["input_ids"]).float()
    return sidecar, gates, trained.module, batch, embeds


@pytest.mark.slow
def test_export_gainlora_sidecar_reproduces_the_gates(tmp_path: Path) -> None:
    sidecar, gates, module, batch, embeds = exported_sidecar(tmp_path, "gainlora_inflora")
    assert gates["G1"].shape[0] == 2 and (tmp_path / "export" / "gainlora" / "memories.safetensors").is_file()
    # The documented formula, applied to the sidecar, gives the model's coefficients.
    mask = batch["gate_mask"].float()[..., None]
    p0 = (embeds * mask).sum(1) / mask.sum(1)
    p1 = F.silu(torch.einsum("bd,nhd->bnh", p0, gates["G1"]))
    p2 = F.silu(torch.einsum("bnh,ndh->bnd", p1, gates["G2"]))
    cos = F.cosine_similarity(p2, gates["keys"][None], dim=-1)
    coeffs = torch.tanh(sidecar["gates"]["key_scale"] * cos / 2).abs()
    with torch.no_grad():
        torch.testing.assert_close(coeffs, module.gate_coefficients(batch), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_sapt_sidecar_reproduces_the_attention(tmp_path: Path) -> None:
    sidecar, gates, module, batch, embeds = exported_sidecar(tmp_path, "sapt_lora")
    assert sidecar["gates"]["pool"] == "max"
    p0 = embeds.masked_fill(batch["gate_mask"][..., None] == 0, float("-inf")).amax(1)  # the documented formula
    h = F.silu(p0 @ gates["query.0.weight"].T @ gates["query.1.weight"].T)
    q = F.layer_norm(h, h.shape[-1:], gates["query.3.weight"], gates["query.3.bias"], eps=1e-5)
    coeffs = torch.softmax(q @ gates["keys"].T / sidecar["gates"]["tau"], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(coeffs, module.gate_coefficients(batch), atol=1e-6, rtol=0)
