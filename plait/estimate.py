"""``plait estimate``: model-state memory per device under ddp and ZeRO 1/2/3, as the ZeRO paper counts it.

Rajbhandari et al. (SC'20), section 3.1 and Figure 1: with mixed-precision Adam a model of Psi
parameters holds 2 Psi bytes of fp16 parameters, 2 Psi of fp16 gradients and K Psi of optimizer
state (K = 12: fp32 master parameters, momentum and variance). Over N data-parallel devices:

    ddp    (2 + 2 + K) Psi
    zero1  2 Psi + 2 Psi + K Psi / N
    zero2  2 Psi + (2 + K) Psi / N
    zero3  (2 + 2 + K) Psi / N

``plait estimate --params 7.5e9 --nproc 64`` prints 120, 31.4, 16.6 and 1.9 GB: the paper's Figure 1.
With ``--model NAME`` the parameter count comes from a plait model preset, and ``--measure`` trains
it for a few steps under each strategy (bf16 mixed precision, as the accounting assumes) on
``--nproc`` local ranks and prints the bytes ``plait.memory_report`` counted beside the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plait import strategies
from plait.errors import ConfigError
from plait.strategies import resolve

STRATEGIES = tuple(
    name for name in strategies.STRATEGIES if resolve(name).model_state_bytes(1.0, 1) is not None
)
"""The strategies the paper's accounting covers (each says so: ddp and zero1/2/3), in the resolver's order."""


def model_state_bytes(params: float, world: int, strategy: str, k: float = 12.0) -> float:
    """Bytes of parameters, gradients and optimizer state one device holds (the paper's formula)."""
    if world < 1:
        raise ConfigError(f"nproc={world} must be >= 1")
    if params <= 0:
        raise ConfigError(f"params={params} must be > 0")
    found = resolve(strategy).model_state_bytes(params, world, k)
    if found is None:
        raise ConfigError(f"strategy={strategy!r} has no estimate; use one of {list(STRATEGIES)}")
    return found


def preset_params(name: str) -> int:
    """Parameters of a plait model preset, counted on the meta device (nothing allocated)."""
    import torch

    from plait.models import GPT, preset

    with torch.device("meta"):
        return GPT(preset(name)).num_params()


@dataclasses.dataclass(frozen=True)
class Measured:
    strategy: str
    model_states: int
    parameters: int
    gradients: int
    optimizer_state: int
    master: int


def measure(model: str, steps: int, out: str) -> None:
    """Run on every rank (under torchrun): a few bf16 steps per strategy, then rank 0 writes the reports."""
    import torch
    import torch.nn.functional as F

    import plait
    from plait.models import GPT, preset
    from plait.strategies import resolve

    ctx = plait.init()
    config = preset(model)
    results = []
    for name in STRATEGIES:
        torch.manual_seed(0)
        strategy = resolve(name, mixed_precision="bf16")
        net, opt = plait.setup(GPT(config), strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-4))
        tokens = torch.randint(0, config.vocab_size, (2, min(64, config.block_size) + 1))
        for _ in range(steps):
            logits = net(tokens[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        report = plait.memory_report(net, opt)
        results.append(
            Measured(
                name,
                report.model_states,
                report.parameters,
                report.gradients,
                report.optimizer_state,
                report.master,
            )
        )
        del net, opt
    if ctx.rank == 0:
        Path(out).write_text(json.dumps([dataclasses.asdict(r) for r in results]))
    plait.shutdown(exit_code=0)


def run(params: float | None, world: int, model: str | None, k: float, measure_steps: int | None) -> int:
    """Print the estimate table (and the measured figures when ``measure_steps`` is given)."""
    if model is not None:
        params = preset_params(model)
    if params is None:
        raise ConfigError("give --params N or --model NAME")
    measured: dict[str, Measured] = {}
    if measure_steps:
        if model is None:
            raise ConfigError("--measure needs --model NAME: something to train")
        from plait.launch import LaunchConfig, launch

        out = str(Path(tempfile.mkdtemp()) / "measured.json")
        code = launch(
            LaunchConfig(nproc=world),
            "plait.estimate",
            ["--measure", model, str(measure_steps), out],
            module=True,
        )
        if code != 0:
            return code
        measured = {m["strategy"]: Measured(**m) for m in json.loads(Path(out).read_text())}

    table = Table(title=f"model-state memory per device: {params:,.0f} parameters, {world} devices, K={k:g}")
    table.add_column("strategy")
    table.add_column("estimate (GB)", justify="right")
    if measured:
        table.add_column("measured (GB)", justify="right")
        table.add_column("params / grads / optimizer / master (MB)", justify="right")
    for name in STRATEGIES:
        estimate = model_state_bytes(params, world, name, k) / 1e9
        row = [name, f"{estimate:,.1f}" if estimate >= 1 else f"{estimate:.3g}"]
        if name in measured:
            m = measured[name]
            row += [
                f"{m.model_states / 1e9:,.3f}",
                f"{m.parameters / 1e6:,.1f} / {m.gradients / 1e6:,.1f} / {m.optimizer_state / 1e6:,.1f} / {m.master / 1e6:,.1f}",
            ]
        table.add_row(*row)
    Console().print(table)
    if measured:
        print(
            "measured: bf16 parameters and gradients, fp32 master and AdamW state, counted from live tensors after "
            "a step; plait also keeps the fp32 gradient the optimizer reads (4 bytes per parameter it updates), "
            "which the paper's K=12 leaves out"
        )
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--measure"]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    measure(sys.argv[2], int(sys.argv[3]), sys.argv[4])
