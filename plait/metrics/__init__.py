"""Per-step measurements: memory, a JSONL log every rank appends to, and the end-of-run summary."""

from plait.metrics.log import MetricsLog, read_metrics
from plait.metrics.memory import MemoryReport, memory_report, peak_memory_bytes

__all__ = ["MemoryReport", "MetricsLog", "memory_report", "peak_memory_bytes", "read_metrics"]
