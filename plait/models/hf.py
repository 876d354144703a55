"""Hugging Face transformers models in plait: causal LMs built from a config, their own tensor-parallel
plans, and export to a directory ``from_pretrained`` loads.

transformers is optional (``pip install plait[hf]``); it is imported only when one of these is used.

Tensor parallelism. An HF config carries ``base_model_tp_plan`` (module glob relative to the base
model -> style), the LM class adds its head's entry (``{'lm_head': 'colwise_gather_output'}``) and
HF merges them into the model's ``tp_plan``. plait applies four of HF's styles, Megatron's splits:

==========================  ==============  =======================================================
HF style                    plait style     what it does
==========================  ==============  =======================================================
``colwise``                 ``col``         Linear split by output features (q/k/v, gate/up)
``rowwise``                 ``row``         Linear split by input features, outputs all-reduced
``embedding_rowwise``       ``vocab``       Embedding split by token rows, lookups all-reduced
``colwise_gather_output``   ``vocab``       output head split by vocabulary, logits gathered
==========================  ==============  =======================================================

Any other style (sequence parallelism, packed or local variants, MoE experts...) is a ConfigError
listing the modules that ask for it, since applying part of a plan would silently train another model.
Attention modules that reshape with ``view(..., -1, head_dim)`` (Llama and most modern decoders) need
nothing else: a column split leaves them this rank's heads.

GPT-2's config carries no plan, so plait brings its own (:data:`GPT2_PLAN`): Megatron's split of the
same architecture as plait's GPT. Its ``Conv1D`` layers are Linears with the weight stored transposed,
(in, out), which plait's column and row splits take as they are (the state dict keeps HF's shapes);
``c_attn`` is a fused q|k|v, split with plait's ``qkv`` style, each of q, k and v by heads (the
attention's ``num_heads`` and ``split_size`` are divided by t).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from plait.errors import ConfigError
from plait.models.gpt import GPT

HF_STYLES: dict[str, str] = {
    "colwise": "col",
    "rowwise": "row",
    "embedding_rowwise": "vocab",
    "colwise_gather_output": "vocab",
}
"""HF tensor-parallel style -> the plait style that computes the same split."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face models need transformers; install plait with the extra: pip install 'plait[hf]'"
        ) from None
    return transformers


GPT2_PLAN: dict[str, str] = GPT.tensor_parallel_plan()
"""plait's tensor-parallel plan for ``GPT2LMHeadModel``, whose config has none: plait's GPT names its
modules as GPT-2 does, so it is plait's GPT plan (Megatron's split)."""


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's Linear, weight (in, out)), without importing it."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def hf_plan(model: nn.Module) -> dict[str, str]:
    """The model's own tensor-parallel plan in HF's styles, keyed by module path from ``model``.

    HF's ``tp_plan`` merges the config's ``base_model_tp_plan`` (prefixed with the base model's
    name), the LM class's own entries (its head) and the vocabulary split of the input embeddings.
    """
    return dict(getattr(model, "tp_plan", None) or {})


def plait_plan(hf: dict[str, str], model_name: str) -> dict[str, str]:
    """An HF plan in plait's styles; ConfigError listing every entry whose style plait cannot apply."""
    if not hf:
        raise ConfigError(
            f"{model_name}'s config has no base_model_tp_plan; pass plait.TensorParallel(plan={{'module.glob': "
            "'col' | 'row' | 'vocab' | 'qkv', ...}})"
        )
    unsupported = {pattern: style for pattern, style in hf.items() if style not in HF_STYLES}
    if unsupported:
        listed = ", ".join(f"{pattern!r}: {style!r}" for pattern, style in unsupported.items())
        raise ConfigError(
            f"{model_name}'s tensor-parallel plan uses styles plait cannot apply: {listed}; plait applies "
            f"{sorted(HF_STYLES)}. Pass plait.TensorParallel(plan=...) with plait's styles to split it yourself"
        )
    return {pattern: HF_STYLES[style] for pattern, style in hf.items()}


def tensor_parallel_plan(model: nn.Module) -> dict[str, str]:
    """plait's plan for an HF model, from the model's own, or GPT-2's from plait (see the module docstring)."""
    own = hf_plan(model)
    if not own and type(model).__name__ == "GPT2LMHeadModel":
        return dict(GPT2_PLAN)
    return plait_plan(own, type(model).__name__)


def load_config(path: str | os.PathLike) -> Any:
    """A transformers config from a ``config.json`` file (or a directory holding one), offline."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        values = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the Hugging Face config {str(path)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from None
    return config_from_dict(values, str(path))


def config_from_dict(values: dict[str, Any], source: str) -> Any:
    """A transformers config from the dict ``config.to_dict()`` gives (or config.json holds)."""
    if not isinstance(values, dict) or "model_type" not in values:
        raise ConfigError(f'{source!r} has no \'model_type\'; write one (e.g. "llama", "gpt2")')
    values = dict(values)
    model_type = values.pop("model_type")
    try:
        return _transformers().AutoConfig.for_model(model_type, **values)
    except ValueError as e:
        raise ConfigError(f"{source!r}: {e}") from None


def context_length(config: Any) -> int:
    """The longest sequence the config's positions allow."""
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError(f"{type(config).__name__} states no context length (max_position_embeddings)")


class HFCausalLM(nn.Module):
    """An HF causal LM with plait's model interface: ``forward(ids) -> logits``, as plait's GPT.

    The HF model is ``self.hf`` (state dict keys ``hf.<its keys>``); its tensor-parallel plan is its own.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    @classmethod
    def from_config_file(cls, path: str | os.PathLike) -> HFCausalLM:
        """A freshly initialised model (seed it with ``torch.manual_seed`` first) from ``config.json``."""
        config = load_config(path)
        return cls(_transformers().AutoModelForCausalLM.from_config(config))

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    @property
    def block_size(self) -> int:
        return context_length(self.hf.config)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""
        return self.hf(input_ids=idx, use_cache=False).logits

    def activation_checkpointing(self) -> None:
        """HF's own activation checkpointing (``activation_checkpointing_enable``), non-reentrant.

        As plait's GPT: each decoder layer's ``forward``, not its ``__call__``, is checkpointed, so
        module hooks fire once; it applies in training mode only, as HF does.
        """
        if not self.hf.supports_gradient_checkpointing:
            raise ConfigError(
                f"{type(self.hf).__name__} does not support activation checkpointing; "
                "train it without --activation-checkpointing"
            )
        self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def tensor_parallel_plan(self) -> dict[str, str]:
        return {f"hf.{pattern}": style for pattern, style in tensor_parallel_plan(self.hf).items()}


def save_pretrained(state: dict[str, torch.Tensor], config: Any, out: str | os.PathLike) -> None:
    """Write ``out/config.json`` and ``out/model.safetensors`` from a state dict of ``config``'s LM.

    The tensors are loaded into a model built from ``config`` (every key must match, tied ones under
    either name), which HF's own ``save_pretrained`` then writes, dropping tied duplicates.
    """
    model = _transformers().AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if name in _tied_names(model)}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"the checkpoint does not fit {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.save_pretrained(str(out), safe_serialization=True)


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier name (HF ties lm_head to the embedding)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """``out/`` for ``from_pretrained`` from a checkpoint of ``plait train``: an HF model's, or plait's GPT
    as a ``GPT2LMHeadModel`` (:func:`gpt_to_gpt2`). Runs in one process.

    The manifest's extra carries the model's config (``checkpoint_extra``); an HF model's keys are
    ``hf.*`` (``HFCausalLM``).
    """
    from plait.checkpoint import export
    from plait.checkpoint.manifest import read_manifest

    extra = read_manifest(checkpoint)["extra"] or {}
    if "hf_config" not in extra and "gpt_config" not in extra:
        raise ConfigError(
            f"{str(checkpoint)!r} records no model config (a checkpoint of plait train saves one); "
            "plait export CHECKPOINT OUT.safetensors still writes its tensors"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    whole = out / "plait-export.safetensors"
    export(checkpoint, whole)
    try:
        state = load_file(str(whole))
    finally:
        whole.unlink()
    if "gpt_config" in extra:
        state, config = gpt_to_gpt2(state, extra["gpt_config"])
    else:
        state = {key.removeprefix("hf."): value for key, value in state.items()}
        config = config_from_dict(extra["hf_config"], str(checkpoint))
    save_pretrained(state, config, out)


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""plait's nn.Linear weights (out, in) that GPT-2's Conv1D stores transposed, as (in, out)."""


def gpt_to_gpt2(state: dict[str, torch.Tensor], shape: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """plait's GPT (nanoGPT's names) as HF's ``GPT2LMHeadModel``: same names, Conv1D weights transposed,
    zero biases where plait has none, exact GELU (plait's ``nn.GELU()``), no dropout."""
    config = _transformers().GPT2Config(
        vocab_size=shape["vocab_size"], n_positions=shape["block_size"], n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], activation_function="gelu", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    converted = {k: v.t().contiguous() if k.endswith(_CONV1D) else v for k, v in state.items()}
    for name, param in _transformers().GPT2LMHeadModel(config).state_dict().items():
        if name not in converted and name.endswith(".bias"):
            converted[name] = torch.zeros_like(param)  # bias=False: GPT-2 always has one
    return converted, config


def checkpoint_extra(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint of ``model`` must carry for ``export_checkpoint``: its config."""
    if isinstance(model, HFCausalLM):
        return {"hf_config": model.hf.config.to_dict()}
    if isinstance(model, GPT):
        return {"gpt_config": dataclasses.asdict(model.config)}
    return {}
