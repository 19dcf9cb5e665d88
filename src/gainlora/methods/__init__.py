"""Continual-learning methods: one class each, composed by Hydra from ``conf/method``."""
from gainlora.methods.base import IncLoRA, Method, SeqLoRA
from gainlora.methods.gainlora import GainLoRA
from gainlora.methods.inflora import InfLoRA
from gainlora.methods.olora import OLoRA
from gainlora.methods.reference import MultiTask, SingleTask

__all__ = ["GainLoRA", "IncLoRA", "InfLoRA", "Method", "MultiTask", "OLoRA", "SeqLoRA", "SingleTask"]
