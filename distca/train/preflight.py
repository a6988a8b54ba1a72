"""Checks a training run passes before any Ray process starts: does it fit this machine?

:func:`validate <distca.config.validate>` checks that a config is consistent; these checks
ask whether it can run here: seeds every RNG accepts, CUDA for CUDA-only choices, real GPUs
for ``ray.num_gpus_per_worker`` (a local cluster is never given GPUs it does not have), CPUs
for the ranks, and a first estimate of host memory. Each failure is a :class:`ConfigError`
(exit 2) naming the key to change, raised in a fraction of a second, before the data is built.
When joining a cluster, :func:`check_cluster` compares the ranks with the cluster's
resources right after connecting.

The memory estimate is deliberately rough (within a factor of about two); it exists to turn
``parallel.dp=1000`` or ``model.hidden_size=65536`` into a message instead of an out-of-memory
kill minutes later, not to size a run tightly.
"""

from __future__ import annotations

import math
import os

from distca.config import AttentionBackend, ConfigError, DistBackend, DistcaConfig, Precision
from distca.train.worker import world_layout

SEED_MAX = 2**32 - 1  # numpy's legacy seeding and torch.manual_seed both accept it
# Logical CPUs a local cluster may hand out per physical core: rank processes mostly wait on
# each other, so some oversubscription is normal (tests run 4 ranks on 2 cores).
CPU_OVERSUBSCRIPTION = 4
GIB = 2**30
PROCESS_BYTES = 0.5 * GIB  # a rank's Python + torch + megatron before any tensor
RAY_BYTES = 0.7 * GIB  # an idle local Ray cluster without the dashboard (design §7)
STATE_BYTES_PER_PARAM = 16  # fp32 weights + gradients + two Adam moments
# What to change when a part of the memory estimate is too large.
LOWER = {"model.hidden_size": "a smaller model, or shard it with parallel.tp/pp, or GPUs "
                              "(ray.num_gpus_per_worker)",
         "data.tokens_per_rank": "fewer tokens per rank (data.tokens_per_rank)",
         "parallel.dp": "fewer ranks (parallel.dp/tp/pp, cad.num_dedicated_servers)",
         "data.micro_batches": "fewer micro-batches per step (data.micro_batches)"}


def _param_count(cfg: DistcaConfig) -> int:
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    attn = m.hidden_size * head_dim * (2 * m.num_attention_heads + 2 * m.num_kv_heads)
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * (attn + mlp) + embeddings


def host_memory(cfg: DistcaConfig) -> dict[str, float]:
    """Estimated host bytes of a local run by what sets them, keyed by the config key to
    lower: model state, activations and processes of every rank, and the step's data."""
    world = len(world_layout(cfg))
    p, d, m = cfg.parallel, cfg.data, cfg.model
    on_gpu = cfg.ray.num_gpus_per_worker > 0  # model and activations live in GPU memory
    shards = p.tp * p.pp
    model = 0.0 if on_gpu else _param_count(cfg) * STATE_BYTES_PER_PARAM / shards
    word = 2 if cfg.trainer.precision is Precision.bf16 else 4
    # saved per layer: the block's inputs, q/k/v/out and the MLP's inner activations
    per_token = m.num_layers / p.pp * (8 * m.hidden_size + 3 * m.ffn_hidden_size / p.tp)
    per_token += 3 * m.vocab_size / p.tp  # logits, their softmax and its gradient
    activations = 0.0 if on_gpu else d.tokens_per_rank * per_token * word
    # the driver builds each step's micro-batches (ids, labels, positions: int64) and Ray's
    # object store holds a second copy
    data = 2 * 3 * 8 * p.dp * d.tokens_per_rank * d.micro_batches
    return {"model.hidden_size": world * model, "data.tokens_per_rank": world * activations,
            "parallel.dp": world * PROCESS_BYTES + RAY_BYTES, "data.micro_batches": data}


def _available_memory() -> float:
    import psutil

    return psutil.virtual_memory().available


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _fail(recipe: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{recipe}: {key}: {message}")


def _check_values(cfg: DistcaConfig, recipe: str) -> None:
    t, d, m = cfg.trainer, cfg.data, cfg.model
    if t.step_timeout_s < 0:
        raise _fail(recipe, "trainer.step_timeout_s", f"must be >= 0 (0: sized from the "
                    f"measured step time), got {t.step_timeout_s}")
    if t.call_timeout_s < 0:
        raise _fail(recipe, "trainer.call_timeout_s", f"must be >= 0 (0: no limit), got "
                    f"{t.call_timeout_s}")
    if not 0 <= t.seed <= SEED_MAX:
        raise _fail(recipe, "trainer.seed", f"must be in [0, 2**32 - 1], got {t.seed}")
    if d.max_length > m.max_position_embeddings:
        raise _fail(recipe, "data.max_length",
                    f"{d.max_length} exceeds model.max_position_embeddings="
                    f"{m.max_position_embeddings}: a document would use positions the model "
                    f"does not have")
    if cfg.parallel.backend is DistBackend.nccl or cfg.attention.backend is AttentionBackend.flash:
        key = ("parallel.backend" if cfg.parallel.backend is DistBackend.nccl
               else "attention.backend")
        if cfg.ray.num_gpus_per_worker <= 0:
            raise _fail(recipe, key, f"{'nccl' if 'parallel' in key else 'flash'} needs CUDA: "
                        f"set ray.num_gpus_per_worker (now 0) or choose another backend")


def check_local(cfg: DistcaConfig, recipe: str) -> None:
    """Everything a run on a private local cluster needs from this machine."""
    _check_values(cfg, recipe)
    world = len(world_layout(cfg))
    r = cfg.ray
    layout = (f"{world} ranks (parallel.dp={cfg.parallel.dp} x tp={cfg.parallel.tp} x "
              f"pp={cfg.parallel.pp} + {world - cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp}"
              f" dedicated servers)")
    cores = os.cpu_count() or 1
    if world * r.num_cpus_per_worker > CPU_OVERSUBSCRIPTION * cores:
        raise _fail(recipe, "parallel.dp",
                    f"{layout} x ray.num_cpus_per_worker={r.num_cpus_per_worker} need "
                    f"{world * r.num_cpus_per_worker:g} CPUs; this machine has {cores} "
                    f"(at most {CPU_OVERSUBSCRIPTION} per core); join a cluster with ray.address")
    if r.num_gpus_per_worker > 0:  # nccl and flash need it (_check_values)
        gpus = _cuda_devices()
        need = math.ceil(world * r.num_gpus_per_worker)
        if gpus == 0:
            raise _fail(recipe, "ray.num_gpus_per_worker",
                        "this machine has no CUDA device (torch sees none); "
                        "use ray.num_gpus_per_worker=0 with parallel.backend=gloo")
        if need > gpus:
            raise _fail(recipe, "ray.num_gpus_per_worker",
                        f"{layout} x {r.num_gpus_per_worker} need {need} GPUs; this machine "
                        f"has {gpus}")
    _check_memory(recipe, host_memory(cfg), _available_memory(), "host memory")


def _check_memory(recipe: str, need: dict[str, float], available: float, where: str) -> None:
    total = sum(need.values())
    if total > available:
        key = max(need, key=need.get)
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in need.items() if v >= 0.05 * GIB)
        raise _fail(recipe, key, f"this run needs about {total / GIB:.1f} GiB of {where} "
                    f"({parts} GiB), {available / GIB:.1f} GiB are available; use {LOWER[key]}")


def check_cluster(cfg: DistcaConfig, recipe: str, resources: dict[str, float]) -> None:
    """The ranks against a joined cluster's total resources (``ray.cluster_resources()``)."""
    _check_values(cfg, recipe)
    world = len(world_layout(cfg))
    r = cfg.ray
    for key, per_rank, kind in (("ray.num_cpus_per_worker", r.num_cpus_per_worker, "CPU"),
                                ("ray.num_gpus_per_worker", r.num_gpus_per_worker, "GPU")):
        have = resources.get(kind, 0.0)
        if world * per_rank > have:
            raise _fail(recipe, key, f"{world} ranks x {per_rank:g} need {world * per_rank:g} "
                        f"{kind}s; the cluster has {have:g}")
    need = host_memory(cfg)
    # the driver builds the step data here; the ranks live on the cluster's nodes
    _check_memory(recipe, {"data.micro_batches": need.pop("data.micro_batches")},
                  _available_memory(), "host memory for the driver")
    if "memory" in resources:  # Ray's memory resource: what its nodes leave to tasks
        need["parallel.dp"] -= RAY_BYTES
        _check_memory(recipe, need, resources["memory"], "memory on the cluster's nodes")
