"""The config schema (gainlora.schema): each bad value is refused with one line naming the key, the
value and what is accepted; good values and every shipped experiment pass; unsafe targets are
refused without being imported or called."""
from __future__ import annotations

import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from gainlora.build import build_method
from gainlora.run import CONF_DIR
from gainlora.schema import ConfigError, check_name, validate_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=demo", *overrides])


# override -> the start of the message (after "error: ")
REFUSED = {
    "lora.rank=0": "lora.rank=0: should be greater than 0",
    "lora.rank=2.5": "lora.rank=2.5: should be a valid integer",
    "lora.rank=abc": "lora.rank=abc: should be a valid integer",
    "lora.rank=true": "lora.rank=true: should be a valid integer",
    "lora.alpha=-1": "lora.alpha=-1: should be greater than 0",
    "lora.alpha='32'": "lora.alpha=32: should be a valid number",
    "lora.dropout=-0.1": "lora.dropout=-0.1: should be greater than or equal to 0",
    "lora.dropout=1.0": "lora.dropout=1.0: should be less than 1",
    "+lora.rnak=4": "lora.rnak=4: unknown key",
    "+lr=0.1": "lr=0.1: unknown key",
    "optimizer.lr=0": "optimizer.lr=0: a number > 0",
    "optimizer.lr=-0.001": "optimizer.lr=-0.001: a number > 0",
    "optimizer.lr=nan": "optimizer.lr=NaN: should be a finite number",
    "optimizer.lr=inf": "optimizer.lr=Infinity: should be a finite number",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay=-0.1: a number >= 0",
    "+optimizer.lrr=0.1": "optimizer.lrr=0.1: unknown key",
    "optimizer._target_=os.system": "optimizer._target_=os.system: not one of the project's optimizers",
    "optimizer._partial_=false": "optimizer._partial_=false: true",
    "data.batch_size=0": "data.batch_size=0: should be greater than 0",
    "data.global_batch_size=-32": "data.global_batch_size=-32: should be greater than 0 or null",
    "data.eval_batch_size=0": "data.eval_batch_size=0",
    "data.num_workers=-1": "data.num_workers=-1: should be greater than or equal to 0",
    "generation.num_beams=0": "generation.num_beams=0: should be greater than 0",
    "backbone.max_new_tokens=0": "backbone.max_new_tokens=0: should be greater than 0",
    "backbone.max_source_length=-1": "backbone.max_source_length=-1",
    "backbone.dtype=float8": "backbone.dtype=float8: should be 'float32', 'bfloat16' or 'float16'",
    "backbone.tiny=nosuch": "backbone.tiny=nosuch: one of t5-demo",
    "backbone.tiny=null": "backbone.name_or_path=null: set exactly one of",
    "backbone.name_or_path=google-t5/t5-large": "backbone.name_or_path=google-t5/t5-large: set exactly one of",
    "+backbone.tiny_overrides.layerz=3": "backbone.tiny_overrides.layerz=3: unknown key",
    "+backbone.tiny_overrides.d_model=0": "backbone.tiny_overrides.d_model=0: should be greater than 0",
    "+backbone.tiny_overrides.d_model=102": "backbone.tiny_overrides.d_model=102: a multiple of heads (4)",
    "+backbone.tiny_overrides.heads=3": "backbone.tiny_overrides.heads=3: a divisor of d_model (128)",
    "+backbone.tiny_overrides.arch=gpt9": "backbone.tiny_overrides.arch=gpt9: should be 't5', ",
    "+backbone.tiny_overrides.name=../x": "backbone.tiny_overrides.name=../x: should match pattern",
    "benchmark.num_tasks=0": "benchmark.num_tasks=0: should be greater than 0 or null",
    "benchmark.num_tasks=-1": "benchmark.num_tasks=-1: should be greater than 0 or null",
    "benchmark.num_tasks=5": "benchmark.num_tasks=5: 1 to 4",
    "benchmark.tasks=[]": "benchmark.tasks=[]: should have at least 1 item or be null",
    "benchmark.tasks=demo_colour": "benchmark.tasks=demo_colour: should be a valid list or null",
    "benchmark.tasks=[1,2]": "benchmark.tasks.0=1: should be a valid string",
    "benchmark.order=9": "benchmark.order=9: one of 1, 2, all",
    "benchmark.tasks=[demo_colour,demo_colour]": "benchmark.tasks=[\"demo_colour\", \"demo_colour\"]: each task at most once",
    "benchmark.reader=bogus": "benchmark.reader=bogus: should be 'demo', 'superni', 'long' or 'custom'",
    "benchmark.n_train=0": "benchmark.n_train=0: should be greater than 0",
    "+benchmark.val_size=0.2": "benchmark.val_size=0.2: the demo reader does not read it",
    "benchmark.selection=best": "benchmark.selection=best: should be 'carved' or 'paper'",
    "+benchmark.carve={demo_colour:test}": "benchmark.carve.demo_colour=test: a task of the stream (demo_colour, "
                                           "demo_parity, demo_continent, demo_sentiment) of the superni or long reader",
    "+benchmark.carve={demo_colour:dev}": "benchmark.carve.demo_colour=dev: should be 'train' or 'test'",
    "+benchmark.carve_test_size=1.5": "benchmark.carve_test_size=1.5: should be less than 1",
    "trainer.max_steps=0": "trainer.max_steps=0: a positive limit",
    "trainer.max_steps=-1": "trainer.max_steps=-1: a positive limit when trainer.max_epochs is unlimited",
    "trainer.max_epochs=0": "trainer.max_epochs=0: a positive limit",
    "trainer.max_steps=-5": "trainer.max_steps=-5: should be greater than or equal to -1",
    "trainer.precision=17": "trainer.precision=17: should be",
    "trainer.accelerator=quantum": "trainer.accelerator=quantum: should be 'auto'",
    "trainer.accelerator=tpu": "trainer.accelerator=tpu: auto, cpu or gpu",
    "trainer.devices=0": "trainer.devices=0: should be",
    "trainer.devices=abc": "trainer.devices=abc: should be",
    "+trainer.max_step=3": "trainer.max_step=3: not a lightning.Trainer argument",
    "+trainer.strategy=ddp": "trainer.strategy=ddp: not a lightning.Trainer argument",
    # Trainer arguments that leave test examples unscored (NaN cells: a traceback at the first task's end)
    "+trainer.fast_dev_run=true": "trainer.fast_dev_run=true: leave it unset (every test example is scored)",
    "+trainer.limit_test_batches=1": "trainer.limit_test_batches=1: leave it unset",
    "+trainer.limit_train_batches=0": "trainer.limit_train_batches=0: a positive limit (0 trains nothing)",
    "trainer.enable_progress_bar=1": "trainer.enable_progress_bar=1: should be a valid boolean",
    "checkpoint.every_n_epochs=-1": "checkpoint.every_n_epochs=-1: should be greater than or equal to 0 or null",
    "+checkpoint.every_n_step=3": "checkpoint.every_n_step=3: unknown key",
    "seed=-1": "seed=-1: should be greater than or equal to 0",
    "seed=abc": "seed=abc: should be a valid integer",
    "resume=yes": "resume=yes: should be a valid boolean",
    "run_id=../x": "run_id=../x: a name of 1-100 characters",
    "run_id=/tmp/x": "run_id=/tmp/x: a name of 1-100 characters",
    "run_id=a/b": "run_id=a/b: a name",
    "run_id=''": "run_id=: a name",
    "run_id=..": "run_id=..: a name",
    "run_id=.": "run_id=.: a name",
    f"run_id={'x' * 101}": "run_id=xxxx",
    "run_id=1.5": "run_id=1.5: a name",
    "exp_name=../../etc": "exp_name=../../etc: a name",
    "metrics.single_task_run=''": "metrics.single_task_run=: should have at least 1 character",
    "method.hidden=abc": "method.hidden=abc: should be a valid integer",
    "method.branches.threshold=0": "method.branches.threshold=0: should be greater than 0",
    "method.branches.threshold=1.5": "method.branches.threshold=1.5: should be less than or equal to 1",
    "method.thresholds=[0.9,0.9]": "method.thresholds=[0.9, 0.9]",
    "+method.bogus=1": "method.bogus=1: unknown key",
    # the branches copy it (${method.max_batches}): the message named method.branches.max_batches
    "method.max_batches=0": "method.max_batches=0: should be greater than or equal to 1 or null",
    "method._target_=torch.load": "method._target_=torch.load: not one of the project's methods (gainlora.methods.",
    "method._target_=numpy.load": "method._target_=numpy.load: not one of the project's methods",
    "method._target_=os.system": "method._target_=os.system: not one of the project's methods",
    "method._target_=gainlora.run.main": "method._target_=gainlora.run.main: not one of the project's methods",
    "method._target_=gainlora.methods.base.subspace_tensors": "method._target_=gainlora.methods.base.subspace_tensors",
    "method._target_=gainlora.methods.nosuch.X": "method._target_=gainlora.methods.nosuch.X: not one of",
    "method.branches._target_=os.system": "method.branches._target_=os.system: not one of the project's methods",
    "strategy.name=bogus": "strategy.name=bogus: one of auto, ddp",
    # torch's own argument checks, made on a throwaway parameter before anything is written
    "+optimizer.betas=[2,3]": "optimizer.betas=[2.0, 3.0]: Invalid beta parameter at index 0",
    "+optimizer.eps=-1": "optimizer.eps=-1.0: Invalid epsilon value",
    # sizes that exhaust the machine before the run would fail: 10^5 beams, workers or layers
    "generation.num_beams=100000": "generation.num_beams=100000: should be less than or equal to 64",
    "data.num_workers=100000": "data.num_workers=100000: at most ",
    "+backbone.tiny_overrides.layers=100000": "backbone.tiny_overrides.layers=100000: a tiny preset of at most 10^9",
    "+backbone.tiny_overrides.d_model=1048576": "backbone.tiny_overrides.d_model=1048576: a tiny preset of at most",
    "+backbone.tiny_overrides.max_positions=1": "backbone.tiny_overrides.max_positions=1: leave it unset for a T5",
    # keys the stream's reader would ignore, and tasks it does not have
    "+benchmark.metric=exact_match": "benchmark.metric=exact_match: the demo reader does not read it",
    "+benchmark.prompt=long": "benchmark.prompt=long: the demo reader does not read it",
    "benchmark.selection=paper": "benchmark.selection=paper: carved (the demo reader has no dev split",
    "benchmark.tasks=[demo_colour,DEMO_COLOUR]": "benchmark.tasks=[\"demo_colour\", \"DEMO_COLOUR\"]: demo tasks "
                                                 "only (DEMO_COLOUR is not one; they are demo_colour, ",
    "run_id=-rf": "run_id=-rf: a name of 1-100 characters",
    "benchmark=custom benchmark.tasks=[examples/custom_tasks/antonyms] +benchmark.order=1":
        "benchmark.order=1: the custom reader does not read it; leave it unset",
    "logger.csv._target_=os.system": "logger.csv._target_=os.system: not one of the project's loggers",
    # the custom reader has no orders: unset tasks named benchmark.order (a key it does not read)
    "benchmark=custom": "benchmark.tasks=null: list your tasks, e.g. benchmark.tasks=[path/to/task_a,",
    # 0 passed the schema and failed in the reader without naming the key
    "benchmark=custom benchmark.tasks=[examples/custom_tasks/antonyms] benchmark.val_size=0":
        "benchmark.val_size=0: should be greater than 0",
    # what a run writes itself, read back from a resumed run's config.yaml (a list was a traceback)
    "+derived.data_sha256=[1,2]": "derived.data_sha256=[1, 2]: should be an object",
    "+derived.code_version={a:1}": "derived.code_version={\"a\": 1}: should be a valid string",
    "+logger.csv.bogus=1": "logger.csv.bogus=1: unknown key",
    # Lightning took both, then divided by 0 at the first fit / ignored an interval past the epoch
    "+trainer.val_check_interval=0": "trainer.val_check_interval=0: should be greater than 0",
    "+trainer.val_check_interval=2.5": "trainer.val_check_interval=2.5: should be a valid integer or less than or equal to 1",
    # generated in memory: 10^9 examples filled the machine's memory
    "benchmark.n_train=1000000000": "benchmark.n_train=1000000000: should be less than or equal to 1000000",
    "benchmark.n_test=1000001": "benchmark.n_test=1000001: should be less than or equal to 1000000",
    # read "should be Tuple should have at most 3 items"
    "method.thresholds=[0.99,0.99,0.99,0.99]": "method.thresholds=[0.99, 0.99, 0.99, 0.99]: should have at most 3 items",
    # validation read the empty val split once the first fit started: a traceback
    "benchmark.n_val=0 trainer.limit_val_batches=1.0": "benchmark.n_val=0: at least 1 while trainer.limit_val_batches",
    # wandb refused it when the first task's logger started, after the run directory was written
    "logger=wandb logger.wandb.project=team/proj": "logger.wandb.project=team/proj: Invalid project name 'team/proj'",
    "logger=wandb logger.wandb.run_id=a:b": "logger.wandb.run_id=a:b: Run ID cannot contain the characters",
    "logger=wandb logger.wandb.job_type=" + "j" * 65: f"logger.wandb.job_type={'j' * 65}: Tag 'jjj",
}


@pytest.mark.parametrize("override", list(REFUSED))
def test_bad_value_is_refused_with_one_line(override):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg_of(*override.split(" ")))
    message = str(err.value)
    assert message.startswith(REFUSED[override]), message
    assert "\n" not in message


# several overrides -> the start of the message: how a method's arguments combine
REFUSED_TOGETHER = {
    ("~method.branches", "+method.branches={_target_:gainlora.methods.EPI}"):
        "method.branches._target_=gainlora.methods.EPI: one of gainlora.methods.InfLoRA, gainlora.methods.OLoRA, "
        "gainlora.methods.IncLoRA, gainlora.methods.CLoRA",
    ("~method.branches", "+method.branches={_target_:gainlora.methods.SeqLoRA}"):
        "method.branches._target_=gainlora.methods.SeqLoRA: one of",
    ("~method.branches", "+method.branches={_target_:gainlora.methods.SAPTLoRA}"):
        "method.branches._target_=gainlora.methods.SAPTLoRA: one of",
    ("~method.branches", "+method.branches={_target_:gainlora.methods.SingleTask}"):
        "method.branches._target_=gainlora.methods.SingleTask: one of",
    ("method=seqlora_replay", "method.method._target_=gainlora.methods.SingleTask"):
        "method._target_=gainlora.methods.Replay: its method: a continual method without a replay buffer of its own, "
        "not single_task",
    ("method=seqlora_replay", "method.method._target_=gainlora.methods.MultiTask"):
        "method._target_=gainlora.methods.Replay: its method: a continual method without a replay buffer",
    ("method=seqlora_replay", "~method.method", "+method.method={_target_:gainlora.methods.SAPTLoRA}"):
        "method._target_=gainlora.methods.Replay: its method: a continual method without a replay buffer",
    ("method=inclora_replay", "~method.method",
     "+method.method={_target_:gainlora.methods.Replay,method:{_target_:gainlora.methods.IncLoRA}}"):
        "method._target_=gainlora.methods.Replay: its method: a continual method without a replay buffer",
    ("method=sapt_lora", "method.seed=-1"): "method.seed=-1: should be greater than or equal to 0",
    ("method=inclora_replay", "method.seed=2147483648"): "method.seed=2147483648: should be less than 2147483648",
    ("method.seed=-1",): "method.seed=-1: should be greater than or equal to 0",
    ("method=l2p", "method.seed=-1"): "method.seed=-1: should be greater than or equal to 0",  # was accepted
    ("method=lfpt5", "method.seed=2147483648"): "method.seed=2147483648: should be less than 2147483648",
    # each CPU device is a process: 100 of them froze the machine
    ("trainer.accelerator=cpu", "trainer.devices=100000"): "trainer.devices=100000: at most ",
    # sampled in generation batches before each task and held in memory: 10^9 meant days of sampling
    ("method=lfpt5", "method.pseudo_per_task=1000000000"):
        "method.pseudo_per_task=1000000000: should be less than or equal to 100000",
    ("optimizer._target_=torch.optim.SparseAdam", "~optimizer.weight_decay"):
        "optimizer._target_=torch.optim.SparseAdam: SparseAdam does not support dense gradients",
}


@pytest.mark.parametrize("overrides", list(REFUSED_TOGETHER), ids=" ".join)
def test_method_combinations_are_refused_with_one_line(overrides):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg_of(*overrides))
    assert str(err.value).startswith(REFUSED_TOGETHER[overrides]), str(err.value)


@pytest.mark.parametrize("inner", ["InfLoRA", "OLoRA", "IncLoRA", "CLoRA"])
def test_gainlora_takes_the_four_branch_methods(inner):
    validate_config(cfg_of("~method.branches", f"+method.branches={{_target_:gainlora.methods.{inner}}}"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU that is absent")
def test_gpu_accelerator_without_cuda_is_refused():
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu: cpu or auto: this machine has no CUDA GPU"):
        validate_config(cfg_of("trainer.accelerator=gpu"))
    validate_config(cfg_of("trainer.accelerator=gpu"), machine=False)  # loading for inference: fine


CLUSTER_VARS = ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LSB_JOBID", "LSB_DJOB_RANKFILE",
                "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "NODE_RANK")


def test_several_nodes_need_a_launcher(monkeypatch):
    """Without one, Lightning's default environment waited 30 minutes for the other nodes."""
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"^trainer.num_nodes=2: 1 here: several nodes need a launcher"):
        validate_config(cfg_of("trainer.num_nodes=2"))
    monkeypatch.setenv("NODE_RANK", "0")  # set by hand on each node, with MASTER_ADDR and MASTER_PORT
    validate_config(cfg_of("trainer.num_nodes=2"))


def test_wandb_mode_is_one_wandb_takes(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "garbage")
    with pytest.raises(ConfigError, match=r"^WANDB_MODE=garbage: Input should be 'online', 'offline'"):
        validate_config(cfg_of("logger=wandb"))
    validate_config(cfg_of())  # only the W&B logger reads it
    monkeypatch.setenv("WANDB_MODE", "disabled")
    validate_config(cfg_of("logger=wandb"))


@pytest.mark.parametrize("overrides", [(), ("logger.wandb.offline=false",)])
def test_online_wandb_without_credentials_is_refused_before_training(overrides, monkeypatch, tmp_path):
    """wandb stopped at its login prompt (no terminal: a traceback) once the first task had trained."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # none: `wandb login` was never run
    if overrides:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", "online")
    key = "logger.wandb.offline=false" if overrides else "WANDB_MODE=online"
    with pytest.raises(ConfigError, match=rf"^{key}: online logging needs W&B credentials \(WANDB_API_KEY, or "
                                          r"`wandb login` once\); none found here. Unset WANDB_MODE"):
        validate_config(cfg_of("logger=wandb", *overrides))
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    validate_config(cfg_of("logger=wandb", *overrides))  # what `wandb login` writes
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    validate_config(cfg_of("logger=wandb", *overrides))


ACCEPTED = ["lora.dropout=0.1", "optimizer.lr=1", "run_id=12", "run_id=a.b-c_1", "benchmark.num_tasks=1",
            "benchmark.num_tasks=4", "benchmark.tasks=[demo_parity]", "trainer.max_epochs=3", "trainer.max_steps=-1",
            "trainer.precision=bf16-mixed", "+trainer.val_check_interval=0.5", "+trainer.val_check_interval=2", "method=inflora", "method=olora",
            "data.global_batch_size=64", "checkpoint.every_n_epochs=null", "strategy=ddp", "logger=wandb",
            "+optimizer.betas=[0.9,0.99]", "method.branches.threshold=1", "optimizer._target_=torch.optim.SGD",
            "generation.num_beams=64", "data.num_workers=2", "benchmark.n_val=0", "+backbone.tiny_overrides.layers=4", "run_id=_x-1"]


@pytest.mark.parametrize("override", ACCEPTED)
def test_good_value_passes(override):
    validate_config(cfg_of(override, "trainer.max_epochs=3") if override == "trainer.max_steps=-1"
                    else cfg_of(override))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_passes_the_schema(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        validate_config(compose("config", overrides=[f"experiment={name}"]), machine=False)
        validate_config(compose("config", overrides=[f"experiment={name}", "debug=cpu_tiny"]))


def test_refused_targets_are_never_imported():
    """Only modules under the allow-listed packages are imported to resolve a target."""
    sys.modules.pop("this", None)  # the Zen of Python prints when imported
    with pytest.raises(ConfigError, match="not one of the project's methods"):
        validate_config(cfg_of("method._target_=this.x"))
    assert "this" not in sys.modules


def test_method_arguments_bind_to_the_constructor():
    """The method section is checked against the class signature and its Annotated constraints,
    and the built method gets exactly the validated values (a list becomes the annotated tuple)."""
    method = build_method(cfg_of("method.branches.threshold=0.9", "method.hidden=7"))
    assert method.branches.threshold == 0.9 and method.gate_spec["hidden"] == 7
    assert method.thresholds == (0.995, 0.99999, 0.99999)


@pytest.mark.parametrize("value, ok", [("run-1", True), ("a" * 100, True), ("0", True), (7, True),
                                       ("a" * 101, False), ("", False), ("a b", False), ("a\\b", False),
                                       ("é", False), (None, False), (True, False), (-1, False), ("-rf", False),
                                       ("a\nb", False)])
def test_run_ids_are_names(value, ok):
    if ok:
        assert check_name("run_id", value) == str(value)
    else:
        with pytest.raises(ConfigError, match="^run_id=") as err:
            check_name("run_id", value)
        assert "\n" not in str(err.value)  # a control character in the value is shown escaped


def test_the_demo_reader_honours_the_instance_caps_and_its_default_is_unchanged():
    """debug=cpu_tiny caps the instances; the demo then generates no more than the caps (they are
    recorded in config.yaml, so they must apply), and without caps it is exactly as before."""
    from gainlora.data.demo import make_demo_task
    from gainlora.data.tasks import load_stream

    capped = load_stream(cfg_of("debug=cpu_tiny").benchmark, seed=0)
    assert [(len(t.train), len(t.val), len(t.test)) for t in capped] == [(16, 8, 8)] * 2
    default = load_stream(cfg_of("benchmark.num_tasks=1").benchmark, seed=0)[0]
    assert default == make_demo_task("demo_colour", seed=0, n_train=800, n_val=100, n_test=200)


def test_a_strategy_outside_lightning_needs_the_runner_s_opt_in(monkeypatch):
    """Only the environment of whoever runs (GAINLORA_TRUSTED_MODULES) can widen the strategy
    allow-list, e.g. to the tests' CPU DeepSpeed shim; a config file alone cannot."""
    monkeypatch.delenv("GAINLORA_TRUSTED_MODULES", raising=False)
    sys.modules.pop("cpu_deepspeed", None)
    with pytest.raises(ConfigError, match=r"^strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy: not one of"):
        validate_config(cfg_of("strategy=ddp", "strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy"))
    assert "cpu_deepspeed" not in sys.modules
