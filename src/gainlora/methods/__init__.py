"""Continual-learning methods: one class each, composed by Hydra from ``conf/method``."""
from gainlora.methods.base import IncLoRA, Method, SeqLoRA
from gainlora.methods.clora import CLoRA
from gainlora.methods.epi import EPI
from gainlora.methods.ewc import EWC
from gainlora.methods.gainlora import GainLoRA
from gainlora.methods.inflora import InfLoRA
from gainlora.methods.kiflora import KIFLoRA
from gainlora.methods.l2p import L2P
from gainlora.methods.lfpt5 import LFPT5
from gainlora.methods.migu import MIGU
from gainlora.methods.olora import OLoRA
from gainlora.methods.reference import MultiTask, SingleTask
from gainlora.methods.replay import Replay
from gainlora.methods.sapt import SAPTLoRA
from gainlora.methods.tasl import TaSL

__all__ = ["CLoRA", "EPI", "EWC", "GainLoRA", "IncLoRA", "InfLoRA", "KIFLoRA", "L2P", "LFPT5", "MIGU", "Method",
           "MultiTask", "OLoRA", "Replay", "SAPTLoRA", "SeqLoRA", "SingleTask", "TaSL"]
