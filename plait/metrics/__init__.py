"""Per-step measurements: memory, a JSONL log every rank appends to, and the end-of-run summary."""

from plait.metrics.log import MetricsLog, read_metrics
from plait.metrics.memory import peak_memory_bytes

__all__ = ["MetricsLog", "peak_memory_bytes", "read_metrics"]
