"""Models that plait trains: a nanoGPT-style GPT and its named size presets."""

from plait.models.gpt import GPT, PRESETS, GPTConfig, preset

__all__ = ["GPT", "PRESETS", "GPTConfig", "preset"]
