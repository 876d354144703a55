"""``--activation-checkpointing``: each block recomputed in backward, the same training under every strategy.

Recomputation changes what is kept between forward and backward, not the mathematics: under every
strategy a run with it must give the losses and the final parameters of the same run without it (and
those are checked against a single process in each strategy's own tests). That block 0 ran forward
again in backward shows the checkpoint was in place. One process group per world size runs every
strategy, plait's GPT and a tiny Hugging Face Llama (HF's own checkpointing) alike.
"""

import json

import pytest
import torch
from torch.testing import assert_close

import plait
from plait.metrics import read_metrics
from plait.models import GPT, preset
from plait.train import Trainer
from plait.train.config import build
from tests.harness import run_ranks

GPT_TINY = {"model": "gpt-tiny", "n_layer": 2, "n_embd": 64, "block_size": 32}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "hidden_size": 32, "intermediate_size": 64, "vocab_size": 256, "max_position_embeddings": 32,
    "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
HF = "llama"
"""Stands for the Llama's ``hf:PATH/config.json`` (written by the test) in the lists below."""
RUNS = {
    2: [
        ("gpt", "ddp", {}),
        ("gpt", "zero1", {}),
        ("gpt", "zero2", {}),
        ("gpt", "zero3", {}),
        ("gpt", "ddp", {"mixed_precision": "bf16"}),  # the recomputation runs under the same autocast
        ("gpt", "zero2", {"mixed_precision": "fp16"}),  # and the same loss scale
        ("gpt", "tp", {}),
        ("gpt", "pp", {}),
        ("gpt", "local-sgd", {"period": 2}),
        ("gpt", "async", {"staleness": 0}),
        (HF, "zero3", {}),
        (HF, "tp", {}),  # no plan given: the Llama config's own
    ],
    4: [
        ("gpt", "hybrid", {"tp": 2, "zero": 1}),
        ("gpt", "hybrid", {"pp": 2, "zero": 2}),
    ],
}
TOLERANCE = dict(rtol=1e-6, atol=1e-6)
"""Recomputation repeats the same kernels on the same inputs: the results agree to round-off."""


def _fit(model: dict, strategy: str, options: dict, checkpointing: bool, run_dir: str) -> tuple:
    """The losses of a short run, how often block 0's attention ran forward, and (rank 0) the final weights."""
    values = {
        "model": {**model, "activation_checkpointing": checkpointing},
        "data": {"data": "synthetic", "synthetic_tokens": 50_000},
        "optim": {"warmup_steps": 2},
        "train": {"steps": 3, "batch_size": 8, "micro_batch": 2, "eval_every": 0, "progress": False,
                  "strategy": strategy, "run_dir": run_dir},
        "strategy": options,
    }  # fmt: skip
    trainer = Trainer(build(values))
    calls = []
    modules = dict(trainer.model.named_modules())
    attention = modules.get("transformer.h.0.attn", modules.get("hf.model.layers.0.self_attn"))
    if attention is not None:  # a pipeline's later stages hold no block 0
        attention.register_forward_hook(lambda *_: calls.append(1))
    trainer.fit()
    rank = plait.current().rank
    losses = [r["loss"] for r in read_metrics(run_dir, "step") if r["rank"] == rank]
    state = plait.full_state_dict(trainer.model)
    return losses, len(calls), state if rank == 0 else None


def _every_run(world: int, run_dir: str, llama: str) -> list:
    out = []
    for i, (kind, strategy, options) in enumerate(RUNS[world]):
        model = {"model": f"hf:{llama}"} if kind == HF else GPT_TINY
        out.append([_fit(model, strategy, options, c, f"{run_dir}/{i}-{c}") for c in (False, True)])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_checkpointing_recomputes_each_block_and_trains_the_same(world, tmp_path):
    pytest.importorskip("transformers")
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps(LLAMA))
    for rank_results in run_ranks(_every_run, world, world, str(tmp_path), str(llama)):
        for (kind, strategy, options), (plain, recomputed) in zip(RUNS[world], rank_results, strict=True):
            what = f"{kind} under {strategy} {options}"
            (plain_losses, plain_calls, plain_state), (losses, calls, state) = plain, recomputed
            assert_close(losses, plain_losses, **TOLERANCE, msg=f"{what}: losses")
            # 3 steps on random tokens: a later loss below the first (bf16's loss moves in 1/64 steps)
            assert min(plain_losses[1:]) < plain_losses[0], f"{what}: did not train"
            if plain_calls:  # the ranks that hold block 0 (a pipeline's first stage)
                assert calls > plain_calls, f"{what}: block 0 was not recomputed in backward"
            if state is not None:
                assert_close(state, plain_state, **TOLERANCE, msg=f"{what}: final parameters")


def test_the_gpt_keeps_its_names_and_its_outputs_and_gradients():
    torch.manual_seed(0)
    model = GPT(preset("gpt-tiny", n_layer=2, n_embd=64, block_size=16))
    x = torch.randint(0, 256, (2, 16))
    names = list(model.state_dict())
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        plain = model(x)
    model.activation_checkpointing()
    assert list(model.state_dict()) == names
    with torch.no_grad():  # evaluation runs the blocks as they are
        assert_close(model(x), plain, rtol=0, atol=0)
    model(x).sum().backward()
    assert_close({n: p.grad for n, p in model.named_parameters()}, want, **TOLERANCE)
