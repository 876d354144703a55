"""plait: train PyTorch models on many workers at once.

ctx = plait.init()
model, optimizer = plait.setup(model, strategy="ddp", optimizer=lambda ps: plait.optim.AdamW(ps, lr=3e-4))
"""

from plait import checkpoint, optim
from plait.api import DesyncError, check_replicas, clip_grad_norm_, full_state_dict, setup
from plait.comm import Context, current, init, shutdown
from plait.errors import ConfigError, MemoryCapExceeded
from plait.metrics import memory_report
from plait.strategies import DDP, AsyncPS, Hybrid, LocalSGD, Pipeline, Plain, Strategy, TensorParallel, Zero
from plait.strategies.compression import PowerSGD, Sign

__all__ = [
    "DDP",
    "AsyncPS",
    "ConfigError",
    "Context",
    "DesyncError",
    "Hybrid",
    "LocalSGD",
    "MemoryCapExceeded",
    "Pipeline",
    "Plain",
    "PowerSGD",
    "Sign",
    "Strategy",
    "TensorParallel",
    "Zero",
    "check_replicas",
    "checkpoint",
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
