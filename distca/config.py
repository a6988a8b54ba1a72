"""The one configuration tree: OmegaConf structured configs loaded from a recipe.

A run is described by a recipe YAML in ``recipes/`` plus ``key=value`` overrides from the
command line. Everything is validated before anything runs; a bad recipe raises
:class:`ConfigError`, whose message names the recipe file and the dotted key at fault, and the
CLI turns it into exit code 2.

Merge order (later wins): dataclass defaults <- model preset (``model.preset``) or pretrained
source (``model.init_from``, :mod:`distca.model_source`) <- recipe <- overrides. A preset fills
the model shape and explicit keys win; a source's shape must not be contradicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distca.config_choices import (
    CHAT_KINDS,
    FAST_TARGETS,
    AttentionBackend,
    AttentionMask,
    DataKind,
    DistBackend,
    OnNan,
    PipelinePlan,
    Precision,
    Recompute,
    ServerMode,
)
from distca.config_sections import LoggingConfig, SynthDataConfig, validate_sections
from distca.memory.keys import memory_key_problem
from distca.model_source import model_layer
from distca.recipe_file import RecipeFileError, paths_as_lists, read_recipe
from distca.rope_scaling import RopeScalingConfig, validate_rope_scaling


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the file and the key."""


@dataclass
class ModelConfig:
    """Llama-family shape (RMSNorm, SwiGLU, GQA, RoPE)."""

    preset: str | None = None
    init_from: str | None = None  # pretrained weights and shape (distca.model_source)
    num_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_kv_heads: int = MISSING
    ffn_hidden_size: int = MISSING
    vocab_size: int = MISSING
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 family)
    gated_attention: bool = False  # Qwen3-Next style sigmoid output gate (design §3)
    learnable_sinks: bool = False  # one sink logit per head (design §3)
    recompute: Recompute = Recompute.none


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    backend: DistBackend = DistBackend.auto
    sequence_parallel: bool = False  # megatron's: norms and residuals sharded over TP ranks


@dataclass
class CadConfig:
    """Core-attention disaggregation (design §4-5)."""

    enabled: bool = True
    tolerance: float = 0.1  # every server's attention cost within (1 + tolerance) * mean
    ping_pong: bool = True
    server_mode: ServerMode = ServerMode.in_place
    num_dedicated_servers: int = 0
    min_shard_tokens: int = 128  # kernels lose efficiency below this shard size
    # Largest receive buffer one rank may need per layer exchange (q/k/v in as a server plus
    # out/lse back as a worker); a plan above it is re-planned with a larger tolerance.
    buffer_budget_mb: float = 1.0e6
    # pp > 1: plan each forward tick's jobs together (tick) or each job alone over all ranks
    # (job: balances the ticks with backwards too, moving more; benchmarks/calibration.py)
    pipeline_plan: PipelinePlan = PipelinePlan.tick


@dataclass
class AttentionConfig:
    backend: AttentionBackend = AttentionBackend.auto
    # attention statistics every N steps (first-token, context, sink mass, sink rate); 0: off
    telemetry_interval: int = 0
    # None: glm for FocuSFT on chat data, causal otherwise; load_config writes the choice back
    mask: AttentionMask | None = None


@dataclass
class FocusftConfig:
    """FocuSFT bilevel fine-tuning (design §6)."""

    enabled: bool = False
    inner_steps: int = 2
    inner_lr: float = 1.0
    inner_grad_clip: float = 1.0
    # backtracking: an inner step that raises the inner loss is undone and retried at half the
    # lr, at most this many times (then the inner loop stops); 0: plain SGD, the reference
    inner_backtrack: int = 0
    rank: int = 32
    alpha: float = 64.0
    layer_fraction: float = 0.35
    targets: list[str] = field(default_factory=lambda: list(FAST_TARGETS))


@dataclass
class DataConfig:
    kind: DataKind = DataKind.synthetic
    paths: list[str] = field(default_factory=list)  # files, directories or globs
    eval_paths: list[str] = field(default_factory=list)  # validation data (trainer.eval_interval)
    synth: SynthDataConfig = field(default_factory=SynthDataConfig)
    tokenizer: str | None = None  # local HF tokenizer directory; None = built-in byte-level
    distribution: str = "pretrain"  # synthetic lengths: pretrain | prolong | a file of lengths
    max_length: int = 4096  # longest document
    tokens_per_rank: int = 4096  # linear-layer token budget per worker and micro-batch
    micro_batches: int = 1
    # documents are packed into packs of this many tokens, never spanning two; a micro-batch
    # holds dp * tokens_per_rank / pack_tokens of them. None: one pack a micro-batch (a document
    # may span every data-parallel rank). Fixed, it makes step N's tokens the same in every
    # layout with the same global batch (dp * micro_batches * tokens_per_rank)
    pack_tokens: int | None = None
    skip_bad_rows: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_fraction: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    steps: int = 100
    seed: int = 1234
    precision: Precision = Precision.fp32
    run_dir: str | None = None  # default: runs/<recipe>-<timestamp>/
    checkpoint_interval: int = 50
    keep_checkpoints: int = 2  # a save needs room for one more: the oldest goes after it
    resume: bool = False
    max_restarts: int = 2
    step_timeout_s: float = 0.0  # a rank silent this long is restarted; 0: 10x slowest step
    # the same for every other call: setup, checkpoint save/load, init_from; 0: no limit
    call_timeout_s: float = 1800.0
    on_nan: OnNan = OnNan.stop
    log_interval: int = 1
    eval_interval: int = 0  # validation loss every N steps on data.eval_paths; 0: none
    eval_batches: int = 1  # steps' worth of eval batches per validation
    device_memory_gib: float | None = None  # the target device's memory; `distca memory`

@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster bound to 127.0.0.1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0


@dataclass
class DistcaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cad: CadConfig = field(default_factory=CadConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    focusft: FocusftConfig = field(default_factory=FocusftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _parse_overrides(overrides: list[str], source: str) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise _fail(source, item, "overrides take the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise _fail(source, "<overrides>", str(exc)) from exc


def _merge_into_schema(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<unknown>"
        reason = str(exc).splitlines()[0]
        raise _fail(source, key, reason) from exc


def load_config(recipe: str | Path, overrides: list[str] | None = None) -> DistcaConfig:
    """Load ``recipe`` plus ``key=value`` overrides into a validated :class:`DistcaConfig`."""
    path = Path(recipe)
    source = str(path)
    try:
        raw = read_recipe(path)
    except RecipeFileError as exc:
        raise _fail(source, "<recipe>", str(exc)) from None
    cli = _parse_overrides(list(overrides or []), f"{source} (command line)")
    conf = OmegaConf.structured(DistcaConfig)

    # the model shape from model.preset or model.init_from (distca.model_source)
    model, data = model_layer(raw, OmegaConf.to_container(cli),
                              lambda key, message: _fail(source, key, message))
    conf = _merge_into_schema(conf, {"model": model, "data": data}, source)

    cli = OmegaConf.create(paths_as_lists(OmegaConf.to_container(cli)))
    raw = paths_as_lists(raw)
    _check_known_keys(raw, conf, source)
    _check_known_keys(OmegaConf.to_container(cli), conf, f"{source} (command line)")
    conf = _merge_into_schema(conf, raw, source)
    conf = _merge_into_schema(conf, cli, f"{source} (command line)")

    missing = sorted(OmegaConf.missing_keys(conf))
    if missing:
        raise _fail(source, missing[0], "must be set (or choose a model.preset)")
    cfg: DistcaConfig = OmegaConf.to_object(conf)
    cfg.attention.mask = chat_mask(cfg)  # recorded resolved, so a run says which mask it used
    if cfg.model.init_from is not None:
        cfg.model.preset = None  # the source gave the shape (model_layer said so)
    validate(cfg, source)
    return cfg


def chat_mask(cfg: DistcaConfig) -> AttentionMask:
    """The run's attention mask: ``attention.mask``, else glm for FocuSFT on chat data (both
    its loops, design §6) and causal for everything else (ordinary SFT)."""
    if cfg.attention.mask is not None:
        return cfg.attention.mask
    glm = cfg.focusft.enabled and cfg.data.kind in CHAT_KINDS
    return AttentionMask.glm if glm else AttentionMask.causal


def _check_known_keys(layer: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Name the full dotted key the user wrote when it is not in the schema."""
    if not isinstance(layer, dict):
        return
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if key not in schema.keys():  # `in` alone is False for MISSING values
            leaf = full
            while isinstance(value, dict) and len(value) == 1:
                (sub, value), = value.items()
                leaf = f"{leaf}.{sub}"
            raise _fail(source, leaf, "no such key in the config tree")
        node = schema._get_node(key)
        if isinstance(node, DictConfig) and not isinstance(value, dict | None):
            raise _fail(source, full, f"must be a mapping of keys, got {value!r}")
        if isinstance(node, DictConfig):
            _check_known_keys(value, node, source, f"{full}.")


def validate(cfg: DistcaConfig, source: str = "<config>") -> None:
    """Check values that types alone cannot: divisibility, ranges, consistency."""
    _check_finite(cfg, source)
    m, p = cfg.model, cfg.parallel
    if problem := memory_key_problem(cfg):  # keys of distca.memory, checked there
        raise _fail(source, *problem)

    def positive(key: str, value: float) -> None:
        if not value > 0:
            raise _fail(source, key, f"must be > 0, got {value}")

    def nonnegative(key: str, value: float) -> None:
        if value < 0:
            raise _fail(source, key, f"must be >= 0, got {value}")

    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                 "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rope_theta",
                 "norm_eps"):
        positive(f"model.{name}", getattr(m, name))
    if m.hidden_size % m.num_attention_heads:
        raise _fail(source, "model.hidden_size",
                    f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_kv_heads:
        raise _fail(source, "model.num_kv_heads",
                    f"{m.num_kv_heads} does not divide num_attention_heads={m.num_attention_heads}")
    for name in ("dp", "tp", "pp"):
        positive(f"parallel.{name}", getattr(p, name))
    if m.num_attention_heads % p.tp:
        raise _fail(source, "parallel.tp",
                    f"num_attention_heads={m.num_attention_heads} is not divisible by tp={p.tp}")
    if m.num_kv_heads % p.tp:
        raise _fail(source, "parallel.tp",
                    f"num_kv_heads={m.num_kv_heads} is not divisible by tp={p.tp}")
    if m.num_layers % p.pp:
        raise _fail(source, "parallel.pp",
                    f"num_layers={m.num_layers} is not divisible by pp={p.pp}")
    for name in ("vocab_size", "ffn_hidden_size"):  # megatron splits both over TP ranks
        if getattr(m, name) % p.tp:
            raise _fail(source, "parallel.tp",
                        f"{name}={getattr(m, name)} is not divisible by tp={p.tp}")

    c = cfg.cad
    nonnegative("cad.tolerance", c.tolerance)
    positive("cad.min_shard_tokens", c.min_shard_tokens)
    nonnegative("cad.num_dedicated_servers", c.num_dedicated_servers)
    if c.server_mode is ServerMode.dedicated and c.num_dedicated_servers == 0:
        raise _fail(source, "cad.num_dedicated_servers",
                    "server_mode=dedicated needs at least one dedicated server")
    if c.server_mode is ServerMode.dedicated and (p.tp, p.pp) != (1, 1):
        raise _fail(source, "cad.server_mode",
                    f"dedicated attention servers run with parallel.tp=1 and pp=1 only "
                    f"(got tp={p.tp}, pp={p.pp}); use the default in-place servers")
    if c.server_mode is ServerMode.dedicated and not c.enabled:
        raise _fail(source, "cad.server_mode",
                    "dedicated attention servers need cad.enabled=true (colocated attention "
                    "would leave them idle)")
    positive("cad.buffer_budget_mb", c.buffer_budget_mb)
    nonnegative("attention.telemetry_interval", cfg.attention.telemetry_interval)
    if cfg.attention.mask is AttentionMask.glm and cfg.data.kind not in CHAT_KINDS:
        raise _fail(source, "attention.mask", f"glm needs chat data (its turns), got "
                                              f"data.kind={cfg.data.kind.value}")

    f = cfg.focusft
    nonnegative("focusft.inner_steps", f.inner_steps)
    positive("focusft.rank", f.rank)
    nonnegative("focusft.inner_lr", f.inner_lr)
    positive("focusft.inner_grad_clip", f.inner_grad_clip)
    nonnegative("focusft.inner_backtrack", f.inner_backtrack)
    if f.enabled and f.inner_backtrack and cfg.parallel.pp > 1:  # its trial forwards are one stage's
        raise _fail(source, "focusft.inner_backtrack", "works with parallel.pp=1 only")
    if not 0 < f.layer_fraction <= 1:
        raise _fail(source, "focusft.layer_fraction", f"must be in (0, 1], got {f.layer_fraction}")
    positive("focusft.alpha", f.alpha)  # alpha = 0 would silence the fast weights
    for target in f.targets:
        if target not in FAST_TARGETS:
            raise _fail(source, "focusft.targets", f"unknown target {target!r} (choose from "
                                                   f"{', '.join(FAST_TARGETS)})")
    if len(set(f.targets)) != len(f.targets) or (f.enabled and not f.targets):
        raise _fail(source, "focusft.targets",
                    f"must name each adapted linear once, at least one, got {list(f.targets)}")

    d = cfg.data
    for name in ("max_length", "tokens_per_rank", "micro_batches"):
        positive(f"data.{name}", getattr(d, name))
    if d.pack_tokens is not None:
        capacity = cfg.parallel.dp * d.tokens_per_rank
        if d.pack_tokens < 1 or capacity % d.pack_tokens:
            raise _fail(source, "data.pack_tokens", f"must divide a micro-batch's "
                        f"parallel.dp * data.tokens_per_rank = {capacity} tokens, got "
                        f"{d.pack_tokens}")
    if d.kind in (DataKind.text, DataKind.chat) and not d.paths:
        raise _fail(source, "data.paths", f"data.kind={d.kind.value} needs at least one path")

    o = cfg.optim
    nonnegative("optim.lr", o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise _fail(source, "optim.min_lr", f"need 0 <= min_lr <= lr={o.lr}, got {o.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise _fail(source, f"optim.{name}", f"must be in [0, 1), got {getattr(o, name)}")
    positive("optim.eps", o.eps)
    nonnegative("optim.weight_decay", o.weight_decay)
    if not 0 <= o.warmup_fraction < 1:
        raise _fail(source, "optim.warmup_fraction", "must be in [0, 1)")
    if o.schedule not in ("cosine", "constant"):
        raise _fail(source, "optim.schedule", f"unknown schedule {o.schedule!r} (cosine, constant)")
    nonnegative("optim.grad_clip", o.grad_clip)  # 0 turns clipping off

    t = cfg.trainer
    for name in ("steps", "checkpoint_interval", "keep_checkpoints", "log_interval"):
        positive(f"trainer.{name}", getattr(t, name))
    nonnegative("trainer.seed", t.seed)
    nonnegative("trainer.max_restarts", t.max_restarts)
    r = cfg.ray
    nonnegative("ray.num_cpus_per_worker", r.num_cpus_per_worker)
    nonnegative("ray.num_gpus_per_worker", r.num_gpus_per_worker)
    if r.num_cpus_per_worker + r.num_gpus_per_worker == 0:  # Ray cannot place an empty bundle
        raise _fail(source, "ray.num_cpus_per_worker", "a rank needs CPUs or GPUs; both are 0")
    validate_sections(cfg, lambda key, message: _fail(source, key, message))
    validate_rope_scaling(m.rope_scaling, lambda key, message: _fail(source, key, message))


def _check_finite(node: Any, source: str, prefix: str = "") -> None:
    """Reject NaN and inf in every float: NaN passes the range checks in :func:`validate`."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_finite(value, source, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _fail(source, f"{prefix}{f.name}", f"must be a finite number, got {value}")


def to_yaml(cfg: DistcaConfig) -> str:
    """The resolved config as YAML (what ``distca config show`` prints and runs record)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
