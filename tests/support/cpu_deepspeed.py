"""Test-only: Lightning's DeepSpeedStrategy on CPU processes talking over gloo.

Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs ZeRO on its CPU accelerator. This
subclass drops the CUDA check and hands DeepSpeed the local rank where Lightning passes the CUDA
device index (None on CPU), so the CPU tests exercise the same ZeRO optimizer, fp32 master weights
and collectives as a GPU run. Never use it for real training.

Selected with ``strategy._target_=cpu_deepspeed.CPUDeepSpeedStrategy``, this folder on PYTHONPATH
and DS_ACCELERATOR=cpu.
"""
from __future__ import annotations

import argparse
import contextlib

import deepspeed
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
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
