"""Whether a recipe's largest rank fits its device, and what would make it fit.

``distca train`` calls :func:`check_fits` once, before Ray starts: a recipe that names its
device (``trainer.device_memory_gib``) and is predicted above it exits 2 with the largest part
and the overrides that the same model predicts to fit.
"""

from __future__ import annotations

import copy

from distca.config import DistcaConfig, Recompute
from distca.errors import UsageError
from distca.memory.estimate import GIB, MemoryEstimate, estimate


def _variants(cfg: DistcaConfig) -> list[tuple[str, DistcaConfig]]:
    """(override, config) of the changes worth suggesting, one key each."""
    out = []
    for mode in (Recompute.selective, Recompute.full):
        if mode is not cfg.model.recompute:
            alt = copy.deepcopy(cfg)
            alt.model.recompute = mode
            out.append((f"model.recompute={mode.value}", alt))
    half = cfg.data.tokens_per_rank // 2
    if half >= 1 and cfg.parallel.dp * half >= cfg.data.max_length:
        alt = copy.deepcopy(cfg)
        alt.data.tokens_per_rank = half
        out.append((f"data.tokens_per_rank={half}", alt))
    return out


def fixes(cfg: DistcaConfig, attention_per_layer: float) -> list[str]:
    """Single overrides predicted to fit ``trainer.device_memory_gib``, each with its peak."""
    found = []
    for override, alt in _variants(cfg):
        scale = alt.data.tokens_per_rank / cfg.data.tokens_per_rank
        est = estimate(alt, attention_per_layer * scale)
        if est.fits:
            found.append(f"{override} ({est.per_rank_gib:.2f} GiB)")
    return found


def describe(est: MemoryEstimate) -> str:
    """One line: the peak, the device, and the largest part."""
    device = "no device named" if est.device_gib is None else f"device {est.device_gib:g} GiB"
    return (f"predicted peak {est.per_rank_gib:.2f} GiB a rank ({device}); largest part "
            f"{est.largest} {est.parts[est.largest] / GIB:.2f} GiB")


def check_fits(cfg: DistcaConfig, recipe: str) -> MemoryEstimate | None:
    """UsageError when ``cfg`` names a device and is predicted not to fit it; None when it
    names none (CPU runs), else the estimate."""
    if cfg.trainer.device_memory_gib is None:
        return None
    from distca.memory.attention import attention_bytes_per_layer

    attention = attention_bytes_per_layer(cfg)
    est = estimate(cfg, attention)
    if est.fits:
        return est
    found = fixes(cfg, attention)
    hint = ("; predicted to fit: " + ", ".join(found) if found else
            "; no single override fits: more tensor or pipeline parallelism, or a device with "
            "more memory")
    raise UsageError(f"{recipe}: trainer.device_memory_gib: {describe(est)}{hint} "
                     f"(see `distca memory {recipe}`)")
