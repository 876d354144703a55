"""The model ``plait train --model`` names: a GPT preset, or a Hugging Face causal LM from its config."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from torch import nn

from plait.errors import ConfigError
from plait.models import GPT, preset
from plait.models.hf import HFCausalLM
from plait.train.config import ModelConfig


def build_model(config: ModelConfig) -> tuple[nn.Module, Any]:
    """The model (seed torch first) and its shape: ``block_size`` and ``vocab_size`` at least.

    A preset's fields may be overridden (``--n-layer`` ...); an HF model's shape is its config.json's,
    but for ``--block-size``, the length of the training windows (at most the model's context).
    """
    overrides = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("model", "dropout", "activation_checkpointing")
        and getattr(config, f.name) is not None
    }
    model, shape = _model_and_shape(config, overrides)
    if config.activation_checkpointing:
        model.activation_checkpointing()
    return model, shape


def _model_and_shape(config: ModelConfig, overrides: dict[str, Any]) -> tuple[nn.Module, Any]:
    if not config.model.startswith("hf:"):
        shape = preset(config.model, dropout=config.dropout, **overrides)
        return GPT(shape), shape
    model = HFCausalLM.from_config_file(config.model.removeprefix("hf:"))
    block_size = overrides.pop("block_size", model.block_size)
    if overrides or config.dropout:
        given = {**overrides, **({"dropout": config.dropout} if config.dropout else {})}
        raise ConfigError(f"{given} do not apply to an hf: model; set them in its config.json")
    if not 0 < block_size <= model.block_size:
        raise ConfigError(
            f"block_size={block_size} must be in [1, {model.block_size}], the context of {config.model}"
        )
    return model, types.SimpleNamespace(block_size=block_size, vocab_size=model.vocab_size)
