"""Export a run's adapters in PEFT's LoRA format: ``python -m gainlora.export RUN --format peft OUT``.

Writes, under OUT:

- ``tasks/<NN>-<task>/``: each task's branch as a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained(base, path)`` on the
  plain Hugging Face backbone. For SeqLoRA (one branch trained through every task) it is that
  branch's state after the task.
- ``merged/`` (gate-free methods: IncLoRA, O-LoRA, InfLoRA, SeqLoRA and the reference runs): the
  model as it answers, every branch summed with coefficient 1, as one adapter of rank n * r
  (``[B_1 .. B_n] [A_1; ..; A_n] = sum_i B_i A_i``; alpha scaled so alpha / rank is unchanged).
- ``gainlora/`` (gated methods): ``gates.safetensors`` (``G1`` n x h x d, ``G2`` n x d x h, ``keys``
  n x d; a gate of depth L has ``G1`` .. ``G(L+1)``, the middle ones n x h x h), ``memories.safetensors`` (the method's GPM bases, needed only to keep training) and
  ``gainlora.json``, which says how to combine the per-task adapters: per input,
  ``y = W h + sum_i a_i(x) (alpha / r) B_i A_i h`` with ``a_i`` from the gates (formula in the JSON).
  PEFT has no per-input weighting of adapters, so a gated model is these files, not one adapter.
  EPI (a routed method: one task's adapter per input) gets the task adapters only, no merged one.
- ``README.md``: what the folder holds.

Phi-3 fuses q, k and v into one ``qkv_proj``: its q and v branches become one LoRA on ``qkv_proj``
of rank 2r whose B is zero on the k rows, the same function.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from gainlora.artifacts import ArtifactError, write_json, write_text, write_tensors
from gainlora.cli import ArgumentParser, error_line, writable_file
from gainlora.model.task_attention import TaskAttention
from gainlora.targets import ConfigError

FORMATS = ("peft",)


class NotExportable(ValueError):
    """The run's method has nothing in the requested format (a prompt method has no LoRA branch)."""
SIDECAR_VERSION = 1


def _fused_parent(module, name: str) -> tuple[str, int] | None:
    """(qkv_proj's name, row offset) for the q or v part of a split fused projection, else None."""
    from gainlora.model.backbone import FusedQKV

    parent, _, part = name.rpartition(".")
    fused = module.backbone.get_submodule(parent) if parent else None
    if not isinstance(fused, FusedQKV):
        return None
    offsets = {"q": 0, "k": fused.q.out_features, "v": fused.q.out_features + fused.k.out_features}
    return parent, offsets[part]


def peft_tensors(module, branches: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per PEFT target module: (A, B) of the LoRA that computes the given per-layer branches.

    ``branches``: adapted layer name -> (A r x d_in, B d_out x r). Parts of a fused projection are
    stacked: A = [A_q; A_v], B holds B_q and B_v in their output rows and zeros elsewhere.
    """
    targets: dict[str, tuple[Tensor, Tensor]] = {}
    fused: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
    for name, (A, B) in branches.items():
        A, B = A.detach().float().cpu().contiguous(), B.detach().float().cpu().contiguous()
        found = _fused_parent(module, name)
        if found is None:
            targets[name] = (A, B)
        else:
            fused.setdefault(found[0], []).append((found[1], A, B))
    for parent, parts in fused.items():
        layer = module.backbone.get_submodule(parent)
        out_features = layer.q.out_features + layer.k.out_features + layer.v.out_features
        A = torch.cat([a for _, a, _ in parts])
        B = torch.zeros(out_features, A.shape[0])
        col = 0
        for offset, a, b in parts:
            B[offset:offset + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        targets[parent] = (A, B)
    return targets


def write_peft_adapter(out: Path, module, branches: dict[str, tuple[Tensor, Tensor]], scale: float) -> Path:
    """One PEFT LoRA adapter computing ``scale * B A h`` on each adapted layer."""
    from peft import LoraConfig

    targets = peft_tensors(module, branches)
    ranks = {A.shape[0] for A, _ in targets.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters of mixed rank {sorted(ranks)} are not exported")
    rank = ranks.pop()
    config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=sorted(targets), lora_dropout=0.0,
                        bias="none", task_type="SEQ_2_SEQ_LM" if module.kind == "seq2seq" else "CAUSAL_LM",
                        base_model_name_or_path=str(module.backbone.name_or_path), inference_mode=True)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {}
    for target, (A, B) in targets.items():
        tensors[f"base_model.model.{target}.lora_A.weight"] = A
        tensors[f"base_model.model.{target}.lora_B.weight"] = B
    write_tensors(out / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return out


def _scale(module) -> float:
    scales = {layer.scale for layer in module.adapted.values()}
    if len(scales) != 1:
        raise ValueError(f"layers with different LoRA scales {sorted(scales)}")
    return scales.pop()


def merged_branches(module) -> dict[str, tuple[Tensor, Tensor]]:
    """Every branch of each layer stacked: with coefficient 1 each, sum_i B_i A_i = B_all A_all."""
    return {name: tuple(t.detach() for t in layer.stacked()) for name, layer in module.adapted.items()}


def export_peft(run: str | Path, out: str | Path) -> dict:
    """Write the run's adapters under ``out`` (see the module docstring); returns the sidecar dict."""
    from gainlora.api import load_run, read_run
    from gainlora.loop import fits

    run_dir, _, names = read_run(run)
    trained = load_run(run)
    module, method = trained.module, trained.method
    if not method.has_branches:
        raise NotExportable(f"method {method.name} learns soft prompts, not LoRA branches: there is no PEFT LoRA "
                            "adapter to export; its prompts are in tasks/*/memory.safetensors and "
                            "gainlora.load_run(run) generates with them")
    out = Path(out)
    scale = _scale(module)
    adapters = {}
    for t, name in fits(method, names):
        if not run_dir.is_done(t, name):
            break
        files, _ = run_dir.load_task(t, name)
        branch = {layer: (files["branch"][f"{layer}.A"], files["branch"][f"{layer}.B"]) for layer in module.adapted}
        folder = run_dir.task_dir(t, name).name
        write_peft_adapter(out / "tasks" / folder, module, branch, scale)
        adapters[name] = f"tasks/{folder}"
    gated, routed = module.gates is not None, module.router is not None
    sidecar = {
        "format": "gainlora-peft-export", "version": SIDECAR_VERSION, "method": method.name,
        "run_kind": method.run_kind, "tasks": list(trained.tasks), "adapters": adapters,
        "base_model": str(module.backbone.name_or_path), "lora_scale": scale,
        "merged": None if gated or routed else "merged",
    }
    if routed:  # EPI: one task's branch per input, chosen from statistics PEFT has no place for
        sidecar["routing"] = ("each input uses the one adapter of the task its frozen-backbone features are "
                              "nearest to (Mahalanobis); the sum of the adapters is not this model, so no merged "
                              "adapter; the task statistics are not exported (gainlora.load_run routes)")
    elif not gated:
        write_peft_adapter(out / "merged", module, merged_branches(module), scale)
    elif isinstance(module.gates, TaskAttention):  # SAPT-LoRA: softmax attention over task keys
        (keys,) = module.gates.stacked()
        query = {f"query.{k}": v.float() for k, v in module.gates.query.state_dict().items()}
        write_tensors(out / "gainlora" / "gates.safetensors", {"keys": keys.float(), **query})
        sidecar["gates"] = {
            "file": "gainlora/gates.safetensors", "order": "key i belongs to adapters' i-th task (tasks order)",
            "pool": module.gate_pool, "tau": module.gates.tau,
            "p0": "the input token embeddings of the prompt's tokens, their coordinate-wise maximum, in float32",
            "formula": "q = layer_norm(silu(query.1.weight @ query.0.weight @ p0); query.3.weight, query.3.bias, "
                       "eps 1e-5); a = softmax(keys @ q / tau)",
            "combine": "y = W h + sum_i a_i(x) * lora_scale * B_i A_i h on every adapted layer",
        }
    else:
        *layers, keys = (t.float() for t in module.gates.stacked())
        write_tensors(out / "gainlora" / "gates.safetensors",
                      {**dict(zip(module.gates.layers, layers, strict=True)), "keys": keys})
        memories = {k: v.float() for k, v in method.memory_tensors().items()}
        if memories:  # write_tensors copies each entry: q and v may share one memory tensor
            write_tensors(out / "gainlora" / "memories.safetensors", memories)
        sidecar["gates"] = {
            "file": "gainlora/gates.safetensors",
            "order": "gate i belongs to adapters' i-th task (tasks order)",
            "pool": module.gate_pool, "key_scale": module.gates.key_scale,
            "p0": "the input token embeddings (model.get_input_embeddings()) of the prompt's tokens (T5: the "
                  "prompt then EOS; decoder-only: BOS then the prompt), averaged over those tokens ('mean'; "
                  "'padded_mean' divides by the batch's padded length instead), in float32",
            "formula": _gate_formula(module.gates.depth, module.gates.output),
            "combine": "y = W h + sum_i a_i(x) * lora_scale * B_i A_i h on every adapted layer, with A_i, B_i "
                       "from adapters[task i]; the coefficients are computed once per input, from the prompt",
        }
        sidecar["memories"] = {"file": "gainlora/memories.safetensors" if memories else None,
                               "what": "GPM bases (orthonormal columns) of the gate and layer input spaces; "
                                       "only needed to continue training"}
    write_json(out / "gainlora.json", sidecar)
    write_text(out / "README.md", _readme(sidecar))
    return sidecar


def _gate_formula(depth: int, output: str) -> str:
    layers = "; ".join(f"p{j} = silu(G{j}[i] @ p{j - 1})" for j in range(1, depth + 2))
    last = f"p{depth + 1}"
    f = {"abs_2sigmoid": f"|tanh(key_scale * cos({last}, keys[i]) / 2)|  (= |2 sigmoid(key_scale * cos) - 1|)",
         "abs_cos": f"|cos({last}, keys[i])|", "sigmoid": f"sigmoid(key_scale * cos({last}, keys[i]))"}[output]
    return f"{layers}; a_i = {f}"


def _readme(sidecar: dict) -> str:
    lines = [f"# PEFT export of a run of `{sidecar['method']}`", "",
             f"Base model: `{sidecar['base_model']}`. Each folder under `tasks/` is one task's LoRA branch, "
             "loadable with `peft.PeftModel.from_pretrained(base_model, folder)`.", ""]
    if sidecar["merged"]:
        lines += ["`merged/` is the model as it answers: every branch summed (gate-free method), one adapter.", ""]
    elif "routing" in sidecar:
        lines += [f"The method routes: {sidecar['routing']}.", ""]
    else:
        lines += ["The method gates its branches per input, which PEFT cannot express: combine the task adapters "
                  "with the coefficients that `gainlora/gates.safetensors` gives, as `gainlora.json` describes "
                  "(`gates.formula`, `gates.combine`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gainlora.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (runs/<experiment>/<run_id>) or the results.json it printed")
    parser.add_argument("out", help="output folder (must not exist or be empty)")
    parser.add_argument("--format", choices=FORMATS, default="peft")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        return error_line(f"out={out}: exists and is not an empty folder")
    run = Path(args.run).resolve()
    if out.resolve().is_relative_to(run.parent if run.is_file() else run):  # a run directory has one writer
        return error_line(f"out={out}: inside the run directory {args.run}; give a folder outside it")
    unwritable = writable_file(out / "gainlora.json")
    if unwritable:
        return error_line(f"out={out}: {unwritable}")
    try:
        sidecar = export_peft(args.run, out)
    except NotExportable as err:  # a prompt method
        return error_line(f"run={args.run}: {err}")
    except (ConfigError, ArtifactError, FileNotFoundError) as err:  # each names its file
        return error_line(str(err))
    extra = " + merged" if sidecar["merged"] else " (routed: no merged adapter)" if "routing" in sidecar else \
        " + gate sidecar"
    print(f"{len(sidecar['adapters'])} task adapter(s){extra} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
