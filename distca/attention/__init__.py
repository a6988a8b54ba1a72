"""Sink-aware core attention over CA-tasks (design §2-3).

``core_attention`` is the one entry point; ``attention_forward``/``attention_backward`` with
``merge_partials``/``apply_sink`` are the pieces for runtimes that split a row's tasks across
attention servers.
"""

from .core import (
    BACKENDS,
    attention_backward,
    attention_forward,
    available_backends,
    core_attention,
)
from .merge import apply_sink, make_sinks, merge_partials
from .tasks import TaskList, make_task_list
from .telemetry import SinkTelemetry, sink_rate, sink_telemetry

__all__ = [
    "BACKENDS",
    "SinkTelemetry",
    "TaskList",
    "apply_sink",
    "attention_backward",
    "attention_forward",
    "available_backends",
    "core_attention",
    "make_sinks",
    "make_task_list",
    "merge_partials",
    "sink_rate",
    "sink_telemetry",
]
