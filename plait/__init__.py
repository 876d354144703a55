"""plait: train PyTorch models on many workers at once.

ctx = plait.init()
model, optimizer = plait.setup(model, strategy="ddp", optimizer=lambda ps: plait.optim.AdamW(ps, lr=3e-4))
"""

from plait import optim
from plait.api import clip_grad_norm_, full_state_dict, setup
from plait.comm import Context, current, init, shutdown
from plait.errors import ConfigError, MemoryCapExceeded
from plait.metrics import memory_report
from plait.strategies import DDP, Plain, Strategy, Zero

__all__ = [
    "DDP",
    "ConfigError",
    "Context",
    "MemoryCapExceeded",
    "Plain",
    "Strategy",
    "Zero",
    "clip_grad_norm_",
    "current",
    "full_state_dict",
    "init",
    "memory_report",
    "optim",
    "setup",
    "shutdown",
]
__version__ = "0.1.0"
