"""plait.optim.AdamW and SGD against torch.optim: same parameters, same state dicts, one kernel per group.

Every parity test trains two copies of one seeded MLP on the same random batches, one with plait's
optimizer and one with torch's, and compares all parameters after the run. The textbook path is
held bit-exact to torch's default single-tensor implementation (the same tensor operations); the
fused path is held within 1e-6 to both torch's fused kernel and its default implementation. The
fused path runs torch's own fused kernel, but not bit-exactly: the kernel finishes each tensor's
last ``numel % vector width`` elements in a scalar loop that rounds differently from its vector
loop (by an ulp), and which elements those are changes when the tensors are one flat run. The
layer widths are odd on purpose so that such elements exist.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import plait
from plait.optim import SGD, AdamW

STEPS = 100
EXACT = dict(rtol=0.0, atol=0.0)
CLOSE = dict(rtol=1e-6, atol=1e-7)

ADAMW_CONFIGS = {
    "default": dict(lr=1e-2),
    "hyper": dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "no-decay": dict(lr=1e-2, weight_decay=0.0),
    "amsgrad": dict(lr=1e-2, amsgrad=True),
    "maximize": dict(lr=1e-3, maximize=True),
}
SGD_CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.5),
    "weight-decay": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    "maximize": dict(lr=0.01, momentum=0.5, maximize=True),
}
CASES = [(AdamW, torch.optim.AdamW, c) for c in ADAMW_CONFIGS.values()] + [
    (SGD, torch.optim.SGD, c) for c in SGD_CONFIGS.values()
]
CASE_IDS = [f"adamw-{k}" for k in ADAMW_CONFIGS] + [f"sgd-{k}" for k in SGD_CONFIGS]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 3))


def batches(steps: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(32, 8, generator=generator), torch.randn(32, 3, generator=generator)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = STEPS,
    seed: int = 1,
    zero_grad: Callable[[], None] | None = None,
    scheduler: Any = None,
) -> None:
    """``steps`` steps on fresh random batches; ``zero_grad`` replaces ``optimizer.zero_grad()``."""
    for x, y in batches(steps, seed):
        (zero_grad or optimizer.zero_grad)()
        loss_of(model, x, y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(actual: nn.Module, expected: nn.Module, tolerance: dict[str, float]) -> None:
    for (name, a), b in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


def run_pair(
    plait_cls: type, torch_cls: type, config: dict, plait_kwargs: dict, torch_kwargs: dict, tolerance: dict
) -> None:
    ours, theirs = make_model(), make_model()
    train(ours, plait_cls(ours.parameters(), **config, **plait_kwargs))
    train(theirs, torch_cls(theirs.parameters(), **config, **torch_kwargs))
    assert_same_params(ours, theirs, tolerance)
    assert not torch.equal(ours[0].weight, make_model()[0].weight), (
        "the optimizer did not move the parameters"
    )


# -- parity over 100 steps ----------------------------------------------------------------------


@pytest.mark.parametrize(("plait_cls", "torch_cls", "config"), CASES, ids=CASE_IDS)
def test_fused_matches_torch_fused(plait_cls: type, torch_cls: type, config: dict) -> None:
    run_pair(plait_cls, torch_cls, config, dict(fused=None), dict(fused=True), CLOSE)


@pytest.mark.parametrize(("plait_cls", "torch_cls", "config"), CASES, ids=CASE_IDS)
def test_fused_matches_torch_default(plait_cls: type, torch_cls: type, config: dict) -> None:
    run_pair(plait_cls, torch_cls, config, dict(fused=None), {}, CLOSE)


@pytest.mark.parametrize(("plait_cls", "torch_cls", "config"), CASES, ids=CASE_IDS)
def test_textbook_matches_torch_default_bitwise(plait_cls: type, torch_cls: type, config: dict) -> None:
    run_pair(plait_cls, torch_cls, config, dict(fused=False), {}, EXACT)


# -- groups and schedules -----------------------------------------------------------------------


def two_groups(model: nn.Module, lrs: tuple[float, float], decays: tuple[float, float]) -> list[dict]:
    head = list(model[4].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    return [
        dict(params=body, lr=lrs[0], weight_decay=decays[0]),
        dict(params=head, lr=lrs[1], weight_decay=decays[1]),
    ]


@pytest.mark.parametrize(
    ("plait_cls", "torch_cls", "extra"),
    [(AdamW, torch.optim.AdamW, {}), (SGD, torch.optim.SGD, dict(momentum=0.9))],
    ids=["adamw", "sgd"],
)
@pytest.mark.parametrize("fused", [None, False], ids=["fused", "textbook"])
def test_per_group_hyperparameters(plait_cls: type, torch_cls: type, extra: dict, fused: bool | None) -> None:
    ours, theirs = make_model(), make_model()
    lrs, decays = (1e-2, 3e-2), (0.0, 0.1)
    train(ours, plait_cls(two_groups(ours, lrs, decays), **extra, fused=fused))
    torch_fused = True if fused is None else None
    train(theirs, torch_cls(two_groups(theirs, lrs, decays), **extra, fused=torch_fused))
    assert_same_params(ours, theirs, CLOSE if fused is None else EXACT)


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + 0.1 * step)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
}


@pytest.mark.parametrize("make_scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
@pytest.mark.parametrize(
    ("plait_cls", "torch_cls", "config"),
    [(AdamW, torch.optim.AdamW, dict(lr=1e-2)), (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9))],
    ids=["adamw", "sgd"],
)
def test_lr_scheduler_drives_plait_like_torch(
    make_scheduler: Callable, plait_cls: type, torch_cls: type, config: dict
) -> None:
    ours, theirs = make_model(), make_model()
    ours_opt = plait_cls(two_groups(ours, (1e-2, 3e-2), (0.0, 0.1)), **config, fused=False)
    theirs_opt = torch_cls(two_groups(theirs, (1e-2, 3e-2), (0.0, 0.1)), **config)
    train(ours, ours_opt, scheduler=make_scheduler(ours_opt))
    train(theirs, theirs_opt, scheduler=make_scheduler(theirs_opt))
    assert [g["lr"] for g in ours_opt.param_groups] == [g["lr"] for g in theirs_opt.param_groups]
    assert_same_params(ours, theirs, EXACT)


# -- gradients that live outside the flat buffer ------------------------------------------------


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "textbook"])
@pytest.mark.parametrize("build_after_backward", [False, True], ids=["built-before", "built-after"])
def test_first_step_uses_gradients_from_before_flattening(
    fused: bool | None, build_after_backward: bool
) -> None:
    """backward, then step() with no zero_grad(): the optimizer flattens the parameters inside that step."""
    ours, theirs = make_model(), make_model()
    x, y = next(batches(1, seed=7))
    ours_opt = None if build_after_backward else AdamW(ours.parameters(), lr=1e-2, fused=fused)
    loss_of(ours, x, y).backward()
    loss_of(theirs, x, y).backward()
    ours_opt = ours_opt or AdamW(ours.parameters(), lr=1e-2, fused=fused)
    ours_opt.step()
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    theirs_opt.step()
    assert_same_params(ours, theirs, CLOSE)
    train(ours, ours_opt, steps=10)
    train(theirs, theirs_opt, steps=10)
    assert_same_params(ours, theirs, CLOSE)


@pytest.mark.parametrize("who", ["optimizer", "model"])
@pytest.mark.parametrize(
    ("plait_cls", "torch_cls", "config"),
    [(AdamW, torch.optim.AdamW, dict(lr=1e-2)), (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9))],
    ids=["adamw", "sgd"],
)
def test_gradients_set_to_none_between_steps(
    who: str, plait_cls: type, torch_cls: type, config: dict
) -> None:
    ours, theirs = make_model(), make_model()
    ours_opt = plait_cls(ours.parameters(), **config, fused=False)
    zero_grad = ours.zero_grad if who == "model" else lambda: ours_opt.zero_grad(set_to_none=True)
    train(ours, ours_opt, steps=20, zero_grad=zero_grad)
    train(theirs, torch_cls(theirs.parameters(), **config), steps=20)
    assert_same_params(ours, theirs, EXACT)


def test_parameter_without_gradient_after_model_zero_grad_is_not_stepped_with_an_old_gradient() -> None:
    """model.zero_grad() sets grads to None; a parameter no backward reaches since then has no gradient.

    For plain SGD "no gradient" and "zero gradient" give the same update, so plait matches torch.
    """
    ours, theirs = make_model(), make_model()
    ours_opt = SGD(ours.parameters(), lr=0.1, fused=False)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches(3, seed=1)):
        for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            model.zero_grad()
            # from the second step on only the head gets a gradient
            features = model[:4](x) if step == 0 else model[:4](x).detach()
            loss_of(model[4], features, y).backward()
            opt.step()
    assert_same_params(ours, theirs, EXACT)


def test_frozen_parameter_is_left_untouched() -> None:
    ours, theirs = make_model(), make_model()
    for model in (ours, theirs):
        model[0].weight.requires_grad_(False)
    frozen = ours[0].weight.detach().clone()
    train(ours, AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1), steps=10)
    train(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1), steps=10)
    assert torch.equal(ours[0].weight, frozen)
    assert ours[0].weight.grad is None
    assert_same_params(ours, theirs, CLOSE)


# -- state dicts ---------------------------------------------------------------------------------


def through_bytes(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


STATE_CASES = [
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
]
STATE_IDS = ["adamw", "adamw-amsgrad", "sgd-momentum", "sgd-nesterov"]


@pytest.mark.parametrize(("plait_cls", "torch_cls", "config"), STATE_CASES, ids=STATE_IDS)
@pytest.mark.parametrize("direction", ["plait-to-torch", "torch-to-plait"])
def test_state_dict_moves_between_plait_and_torch(
    plait_cls: type, torch_cls: type, config: dict, direction: str
) -> None:
    """Train 30 steps with one library, save, load into the other, train 30 more: as if torch did all 60."""
    reference = make_model()
    reference_opt = torch_cls(reference.parameters(), **config)
    train(reference, reference_opt, steps=30, seed=1)
    train(reference, reference_opt, steps=30, seed=2)

    first_cls, second_cls = (
        (plait_cls, torch_cls) if direction == "plait-to-torch" else (torch_cls, plait_cls)
    )
    first_kwargs, second_kwargs = (
        (dict(fused=False), {}) if first_cls is plait_cls else ({}, dict(fused=False))
    )
    first = make_model()
    first_opt = first_cls(first.parameters(), **config, **first_kwargs)
    train(first, first_opt, steps=30, seed=1)

    second = make_model(seed=123)
    second.load_state_dict(through_bytes(first.state_dict()))
    second_opt = second_cls(second.parameters(), **config, **second_kwargs)
    second_opt.load_state_dict(through_bytes(first_opt.state_dict()))
    train(second, second_opt, steps=30, seed=2)
    assert_same_params(second, reference, EXACT)


def test_plait_state_dict_has_one_step_tensor_per_parameter() -> None:
    """torch's optimizers add 1 to each parameter's step in place: a step tensor shared by parameters breaks them."""
    model = make_model()
    optimizer = AdamW(model.parameters())
    train(model, optimizer, steps=3)
    steps = [entry["step"] for entry in optimizer.state_dict()["state"].values()]
    assert len({id(s) for s in steps}) == len(steps)
    assert all(float(s) == 3 for s in steps)


def test_load_state_dict_into_an_optimizer_that_already_stepped() -> None:
    reference = make_model()
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    train(reference, reference_opt, steps=10, seed=1)
    ours = make_model()
    ours_opt = AdamW(ours.parameters(), lr=1e-2, fused=False)
    train(ours, ours_opt, steps=5, seed=99)
    ours.load_state_dict(reference.state_dict())
    ours_opt.load_state_dict(through_bytes(reference_opt.state_dict()))
    train(ours, ours_opt, steps=10, seed=2)
    train(reference, reference_opt, steps=10, seed=2)
    assert_same_params(ours, reference, EXACT)


# -- one update per group, not per parameter ------------------------------------------------------


def wide_model() -> nn.Module:
    """50 parameters: 25 small linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(25)])


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = []
    original = getattr(torch, name)

    def counting(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(params))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(torch, name, counting)
    return calls


@pytest.mark.parametrize(
    ("plait_cls", "kernel", "config"),
    [(AdamW, "_fused_adamw_", {}), (SGD, "_fused_sgd_", dict(momentum=0.9))],
    ids=["adamw", "sgd"],
)
def test_step_calls_the_fused_kernel_once_per_group(
    monkeypatch: pytest.MonkeyPatch, plait_cls: type, kernel: str, config: dict
) -> None:
    calls = count_calls(monkeypatch, kernel)
    model = wide_model()
    params = list(model.parameters())
    assert len(params) == 50
    optimizer = plait_cls([dict(params=params[:20]), dict(params=params[20:], lr=1e-2)], **config)
    x = torch.randn(8, 4)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    assert calls == [1, 1] * 3, f"{kernel} called with tensor lists of lengths {calls}"


class CountOps(torch.overrides.TorchFunctionMode):
    """Counts tensor operations; reading an attribute such as ``param.grad`` is not one."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.__name__ != "__get__"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("plait_cls", "config"), [(AdamW, dict(amsgrad=True)), (SGD, dict(momentum=0.9, nesterov=True))]
)
def test_textbook_step_runs_as_many_tensor_ops_for_50_parameters_as_for_6(
    plait_cls: type, config: dict
) -> None:
    def ops_per_step(model: nn.Module) -> int:
        optimizer = plait_cls(model.parameters(), **config, fused=False)
        x = torch.randn(8, model[0].in_features)
        for _ in range(2):  # the second step is a steady one: state exists, momentum not first
            optimizer.zero_grad()
            model(x).sum().backward()
            with CountOps() as counter:
                optimizer.step()
        return counter.count

    assert ops_per_step(wide_model()) == ops_per_step(make_model())


# -- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda p: AdamW(p, lr=-1), "lr=-1"),
        (lambda p: AdamW(p, betas=(1.0, 0.9)), "betas=(1.0, 0.9)"),
        (lambda p: AdamW(p, eps=-1e-8), "eps=-1e-08"),
        (lambda p: AdamW(p, weight_decay=-0.1), "weight_decay=-0.1"),
        (lambda p: SGD(p, lr=-1), "lr=-1"),
        (lambda p: SGD(p, lr=0.1, momentum=-0.5), "momentum=-0.5"),
        (lambda p: SGD(p, lr=0.1, nesterov=True), "nesterov=True"),
        (lambda p: SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_value(make: Callable, named: str) -> None:
    with pytest.raises(plait.ConfigError) as error:
        make(make_model().parameters())
    assert named in str(error.value)
