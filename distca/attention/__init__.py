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
from .gating import apply_gate, make_sinks, split_query_and_gate
from .merge import apply_sink, merge_partials
from .tasks import TaskList, make_task_list
from .telemetry import AttentionStats, LayerMasses, RowSpec, layer_masses

__all__ = [
    "AttentionStats",
    "BACKENDS",
    "LayerMasses",
    "RowSpec",
    "TaskList",
    "apply_gate",
    "apply_sink",
    "attention_backward",
    "attention_forward",
    "available_backends",
    "core_attention",
    "layer_masses",
    "make_sinks",
    "make_task_list",
    "merge_partials",
    "split_query_and_gate",
]
