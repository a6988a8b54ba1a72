"""distca.scheduler: documents -> CA-tasks -> attention servers (design §2, §4).

numpy only: this layer never imports torch, so it plans fast on any rank or laptop.

    docs = documents_from_batch(doc_lengths, turn_lengths, turn_is_context)
    plan = plan_step(docs, num_workers=W, tokens_per_worker=T, num_servers=S, tolerance=0.1)
    q_tokens, kv_tokens, q_ranges, kv_ranges, causal = plan.server_inputs(s)
"""

from distca.scheduler.cost import CostTable, ModelShape, attention_flops_per_pair
from distca.scheduler.documents import Document, DocumentBatch, documents_from_batch, task_pairs
from distca.scheduler.plan import TASK_DTYPE, TRANSFER_DTYPE, Plan
from distca.scheduler.planner import PLANNERS, imbalance_floor, plan_step, timed_plan_step

__all__ = [
    "PLANNERS", "TASK_DTYPE", "TRANSFER_DTYPE", "CostTable", "Document", "DocumentBatch",
    "ModelShape", "Plan", "attention_flops_per_pair", "documents_from_batch", "imbalance_floor",
    "plan_step", "task_pairs", "timed_plan_step",
]
