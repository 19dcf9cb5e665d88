"""Test-only: Lightning's DeepSpeedStrategy on CPU processes talking over gloo.

Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs ZeRO on its CPU accelerator. This
subclass drops the CUDA check and hands DeepSpeed the local rank where Lightning passes the CUDA
device index (None on CPU), so the CPU tests exercise the same ZeRO optimizer, fp32 master weights
and collectives as a GPU run. Never use it for real training.

Selected with ``strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy``, this folder on PYTHONPATH
and DS_ACCELERATOR=cpu; the run's trainer factory adds the project's DeepSpeed changes to it
(``gainlora.dist.continual_strategy``), as to Lightning's own class.
"""
from __future__ import annotations

import argparse
import contextlib

import deepspeed
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def __init__(self, *args, param_persistence_threshold: int | None = None, **kwargs) -> None:
        """``param_persistence_threshold``: ZeRO-3 keeps parameters of at most this many elements
        whole on every rank (DeepSpeed's default 1e5 covers every tensor of the tiny test models;
        0 partitions them all, as a real model's large ones are)."""
        super().__init__(*args, **kwargs)
        if param_persistence_threshold is not None:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # gloo: Lightning's choice for CPU devices

    def _setup_model_and_optimizer(self, *args, **kwargs):
        with self._device_rank_is_local_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, model) -> None:
        with self._device_rank_is_local_rank():
            super()._initialize_deepspeed_inference(model)

    @contextlib.contextmanager
    def _device_rank_is_local_rank(self):
        real = deepspeed.initialize

        def initialize(*args, **kwargs):
            kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return real(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = real
