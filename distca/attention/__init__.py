"""Sink-aware core attention over CA-tasks (design §2-3).

``core_attention`` is the one entry point; ``attention_forward``/``attention_backward`` with
``apply_sink`` (and :func:`distca.parallel.dispatch.merge_partials`, the one merge of partial
rows by LSE) are the pieces for runtimes that split a row's tasks across attention servers.
"""

from .core import (
    BACKENDS,
    attention_backward,
    attention_forward,
    available_backends,
    core_attention,
)
from .merge import apply_sink, make_sinks
from .tasks import TaskList, make_task_list
from .telemetry import AttentionStats, LayerMasses, RowSpec, layer_masses

__all__ = [
    "AttentionStats",
    "BACKENDS",
    "LayerMasses",
    "RowSpec",
    "TaskList",
    "apply_sink",
    "attention_backward",
    "attention_forward",
    "available_backends",
    "core_attention",
    "layer_masses",
    "make_sinks",
    "make_task_list",
]
