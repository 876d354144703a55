"""Hugging Face transformers models under plait: tiny GPT-2 and Llama built from configs, offline.

Each is trained the HF way (``model(input_ids=x, labels=x).loss``) under every strategy and compared
with a single process: the loss of every step and the logits of the trained model on a fixed batch
(not the parameters: GPT-2's attention key bias gets a zero gradient in exact arithmetic, whose
round-off Adam turns into drift; see shared FACTS.md). Tensor parallelism gets no plan: it reads
Llama's own ``base_model_tp_plan``, and for GPT-2, whose config has none, plait's (its transposed
``Conv1D`` weights and fused q|k|v split as they are). One process group runs all strategies, so transformers is
imported once per rank.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded anywhere in this file

transformers = pytest.importorskip("transformers")

import plait  # noqa: E402
from plait.models import hf  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 8
SEQUENCE = 16
VOCAB = 64
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
LOGITS = dict(rtol=1e-4, atol=1e-4)
"""Logits (|z| ~ 1) carry Adam's amplified round-off of the near-zero-gradient elements: ~1.5e-5 here."""


def make_config(kind: str):
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(
            n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=SEQUENCE, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    return LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=SEQUENCE, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


def make_model(kind: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config(kind))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQUENCE), generator=generator) for _ in range(STEPS + 1)]


def train(kind: str, strategy) -> tuple[list[float], torch.Tensor]:
    """Losses of every step (global means) and the trained model's logits on a held-out batch."""
    ctx = plait.current()
    model, optimizer = plait.setup(
        make_model(kind), strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    )
    dp_rank, dp_size = model.dp_rank, model.dp_size
    local = GLOBAL_BATCH // dp_size
    *steps, held_out = batches()
    losses = []
    for x in steps:
        x = x[dp_rank * local : (dp_rank + 1) * local]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().reshape(1)
        if ctx.world_size > 1:
            ctx.world.all_reduce(mean, op="avg")  # every rank of a tp group holds the same loss
        losses.append(mean.item())
    with torch.no_grad():
        logits = model(input_ids=held_out).logits
    return losses, logits


def strategies(world_size: int) -> dict[str, object]:
    found: dict[str, object] = {name: name for name in ("ddp", "zero1", "zero2", "zero3")}
    found["tp"] = plait.TensorParallel(size=2)  # no plan: the Llama config's own, plait's for GPT-2
    found["hybrid"] = plait.Hybrid(dp=world_size // 2, tp=2, zero=1)
    return found


def run_all(kinds: tuple[str, ...]) -> dict[tuple[str, str], tuple[list[float], torch.Tensor]]:
    results = {}
    for kind in kinds:
        for name, strategy in strategies(plait.current().world_size).items():
            results[kind, name] = train(kind, strategy)
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[float], torch.Tensor]]:
    """The single-process runs (in a rank of its own, so the test process stays free of gloo)."""
    return run_ranks(_reference, 1)[0]


def _reference() -> dict[str, tuple[list[float], torch.Tensor]]:
    return {kind: train(kind, "none") for kind in ("gpt2", "llama")}


@pytest.mark.parametrize("world_size", [2, 4])
def test_hf_models_match_a_single_process_under_every_strategy(world_size, reference):
    results = run_ranks(run_all, world_size, ("gpt2", "llama"))
    assert {("llama", "tp"), ("llama", "hybrid"), ("gpt2", "tp"), ("gpt2", "hybrid")} <= set(results[0])
    for rank_results in results:
        for (kind, name), (losses, logits) in rank_results.items():
            want_losses, want_logits = reference[kind]
            assert_close(losses, want_losses, **TOLERANCE, msg=f"{kind} under {name}: losses")
            assert_close(logits, want_logits, **LOGITS, msg=f"{kind} under {name}: logits")
    assert reference["llama"][0][-1] < reference["llama"][0][0]  # it trained


def test_llama_plan_is_read_from_its_config_and_mapped_to_plait_styles():
    model = make_model("llama")
    plan = hf.tensor_parallel_plan(model)
    assert plan["model.layers.*.self_attn.q_proj"] == "col"
    assert plan["model.layers.*.self_attn.o_proj"] == "row"
    assert plan["model.layers.*.mlp.down_proj"] == "row"
    assert plan["model.embed_tokens"] == "vocab" and plan["lm_head"] == "vocab"
    assert len(plan) == 9


def test_styles_plait_cannot_apply_are_listed_in_one_error():
    hf_plan = {"layers.*.q_proj": "colwise", "norm": "sequence_parallel", "layers.*.experts": "grouped_gemm"}
    with pytest.raises(plait.ConfigError, match="sequence_parallel") as error:
        hf.plait_plan(hf_plan, "MyModel")
    assert "'layers.*.experts': 'grouped_gemm'" in str(error.value)
    assert "layers.*.q_proj" not in str(error.value)


def test_gpt2_has_no_plan_of_its_own_and_takes_plaits():
    model = make_model("gpt2")
    assert not hf.hf_plan(model)
    assert hf.tensor_parallel_plan(model) == hf.GPT2_PLAN
    with pytest.raises(plait.ConfigError, match="MyModel's config has no base_model_tp_plan"):
        hf.plait_plan({}, "MyModel")


def _train_and_save(model: str, run_dir: str) -> torch.Tensor:
    from plait.train import Trainer
    from plait.train.config import build

    values = {
        "model": {"model": model, **({"n_layer": 2, "n_embd": 64, "block_size": SEQUENCE} if model == "gpt-tiny" else {})},
        "data": {"data": "synthetic", "synthetic_tokens": 20_000},
        "optim": {"warmup_steps": 1},
        "train": {
            "steps": 3, "batch_size": 4, "micro_batch": 2, "strategy": "zero2", "eval_every": 0,
            "save_every": 3, "progress": False, "run_dir": run_dir,
        },
    }  # fmt: skip
    trainer = Trainer(build(values))
    trainer.fit()
    with torch.no_grad():
        return trainer.model(batches()[0])


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_plait_train_then_export_what_from_pretrained_loads(kind, tmp_path):
    """An HF config trained by plait train --model hf:..., and plait's own GPT (as GPT-2), exported."""
    if kind == "llama":
        make_config("llama").save_pretrained(tmp_path / "cfg")
        model = f"hf:{tmp_path / 'cfg' / 'config.json'}"
    else:
        model = "gpt-tiny"
    run_dir = tmp_path / "run"
    logits = run_ranks(_train_and_save, 2, model, str(run_dir))[0]
    out = tmp_path / "exported"
    checkpoint = run_dir / "checkpoints" / "step_000003"
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "export", str(checkpoint), "--hf", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == ("LlamaForCausalLM" if kind == "llama" else "GPT2LMHeadModel")
    with torch.no_grad():
        assert_close(loaded(input_ids=batches()[0]).logits, logits, rtol=1e-5, atol=1e-5)
    if kind == "llama":
        assert not torch.allclose(make_model("llama")(input_ids=batches()[0]).logits, logits)  # it trained
