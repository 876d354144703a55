"""Started by tests/test_shutdown.py: a few DDP steps of a tiny model on every rank, ended the README's way."""

import sys

import torch

import plait

ctx = plait.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
model, optimizer = plait.setup(model, "ddp", lambda params: plait.optim.AdamW(params, lr=1e-2))
for _ in range(3):
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
plait.shutdown()
if sys.argv[1:] == ["raise"]:
    raise RuntimeError("a failure after shutdown")
if sys.argv[1:] == ["exit5"]:
    sys.exit(5)
