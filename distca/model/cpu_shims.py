"""The megatron-core 0.16 CPU compatibility shims, in one place (design §8).

megatron-core assumes CUDA in a few spots that distca reaches on CPU. Each shim below is applied
only when CUDA is absent, is idempotent, and changes nothing else:

* ``torch.cuda.current_device`` (RoPE buffers, the global memory buffer, pipeline schedules)
  returns the CPU device instead of raising.
* The CUDA RNG tracker (``model_parallel_cuda_manual_seed``) is replaced by one that forks the
  CPU generator, so tensor-parallel initialisation and dropout regions work.
* Gradient clipping and the distributed optimizer are not patched: distca clips gradients itself
  and uses a plain optimizer on CPU.
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


class CpuRngTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that keeps named CPU generator states."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU when CUDA is absent; returns whether shims are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    tracker = CpuRngTracker()
    mc_random._CUDA_RNG_STATE_TRACKER = tracker
    mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True
    return True


def seed_model_parallel(seed: int, tp_rank: int) -> None:
    """Seed the RNG streams megatron expects: the default one and a per-TP-rank one."""
    from megatron.core.tensor_parallel import random as mc_random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mc_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mc_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
