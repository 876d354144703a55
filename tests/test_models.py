"""The GPT model: shapes, weight tying, config validation, presets, and that it can learn."""

import math

import pytest
import torch
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.models import GPT, PRESETS, GPTConfig, preset

SMALL = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


def _meta_param_count(config: GPTConfig) -> int:
    """Count parameters without allocating them, so large presets cost nothing to check."""
    with torch.device("meta"):
        return GPT(config).num_params()


def _analytic_param_count(config: GPTConfig) -> int:
    """GPT-2's parameter count from the shapes alone: an independent check on num_params()."""
    d, bias = config.n_embd, int(config.bias)
    layer_norm = d + bias * d
    attention = d * 3 * d + bias * 3 * d + d * d + bias * d
    mlp = d * 4 * d + bias * 4 * d + 4 * d * d + bias * d
    block = 2 * layer_norm + attention + mlp
    embeddings = config.vocab_size * d + config.block_size * d  # wte is also lm_head: counted once
    return embeddings + config.n_layer * block + layer_norm


def test_logits_cover_every_position():
    model = GPT(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, SMALL.vocab_size)


def test_embedding_and_head_share_one_parameter():
    model = GPT(SMALL)
    assert model.transformer.wte.weight is model.lm_head.weight
    names = [name for name, _ in model.named_parameters()]
    assert sum("wte" in name or "lm_head" in name for name in names) == 1


def test_output_at_t_depends_only_on_tokens_up_to_t():
    model = GPT(SMALL).eval()
    idx = torch.randint(0, SMALL.vocab_size, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % SMALL.vocab_size
    torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(idx)[:, 8:], model(changed)[:, 8:])


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="T=17 exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"n_embd": 100, "n_head": 3},
            r"n_embd=100 is not divisible by n_head=3; .*\{1, 2, 4, 5, 10, 20, 25, 50, 100\}",
        ),
        ({"n_layer": 0}, "n_layer=0"),
        ({"vocab_size": -5}, "vocab_size=-5"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ],
)
def test_config_errors_name_the_bad_value(fields, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**fields)


def test_init_scales_residual_projections_and_zeroes_biases():
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = GPT(SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, SMALL.vocab_size, (4, SMALL.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(SMALL.vocab_size), rel=0.1)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_matches_the_shapes(name):
    config = PRESETS[name]
    assert _meta_param_count(config) == _analytic_param_count(config)


@pytest.mark.parametrize(
    ("name", "target", "tolerance"),
    [
        ("gpt-small", 124e6, 0.01),
        ("gpt-medium", 350e6, 0.02),
        ("gpt-bench-7m", 7.4e6, 0.10),
        ("gpt-bench-168m", 168e6, 0.05),
    ],
)
def test_preset_sizes(name, target, tolerance):
    assert _meta_param_count(PRESETS[name]) == pytest.approx(target, rel=tolerance)


def test_tiny_preset_runs():
    config = preset("gpt-tiny")
    logits = GPT(config)(torch.zeros(2, config.block_size, dtype=torch.long))
    assert logits.shape == (2, config.block_size, 256)


def test_preset_overrides_are_validated():
    assert preset("gpt-mini", dropout=0.1).dropout == 0.1
    with pytest.raises(ConfigError, match="n_head=5"):
        preset("gpt-mini", n_head=5)


def test_unknown_preset_lists_the_known_names():
    with pytest.raises(ConfigError, match=r"'gpt-huge'.*gpt-bench-7m"):
        preset("gpt-huge")
