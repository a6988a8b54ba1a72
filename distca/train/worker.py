"""One rank of the training job, run as a Ray actor.

The driver starts one :class:`RankWorker` per rank, then calls :meth:`setup` on all of them
at once: each joins torch.distributed (gloo on CPU, nccl on GPU) and builds the
:class:`distca.step.Step` of its role (:func:`distca.rank.make_rank`). Afterwards the driver sends every rank the same micro-batches
per step. Ray is the control plane only; tensors between ranks go over torch.distributed.

Nothing listens on every interface: the multi-node rendezvous store listens on rank 0's node
address (a socket bound here and handed to torch's TCPStore, which would otherwise bind
0.0.0.0), and gloo and NCCL use the network interface of the address Ray reports for the node
(by default they take whatever the host name resolves to).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from distca.config import DistcaConfig
from distca.mesh import dedicated_server_count


def interface_of(address: str) -> str | None:
    """The network interface holding ``address`` on this machine, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def world_layout(cfg: DistcaConfig) -> list[str]:
    """The role of every rank: workers first, then dedicated attention servers."""
    p = cfg.parallel
    return ["worker"] * (p.dp * p.tp * p.pp) + ["attention_server"] * dedicated_server_count(cfg)


class RankWorker:
    def __init__(self, cfg: DistcaConfig, rank: int, world_size: int, role: str):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.role = role
        self.step = None

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "role": self.role, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def listen(self, host: str) -> int:
        """Rank 0: bind the rendezvous store's socket to ``host`` (this node's address) now,
        so its port can be sent to every rank; returns the port."""
        self._listener = socket.create_server((host, 0))
        return self._listener.getsockname()[1]

    def setup(self, init_method: str) -> None:
        """Join torch.distributed over ``init_method`` (``file://`` or ``tcp://HOST:PORT``,
        where rank 0 hands over the socket of :meth:`listen`) with gloo/NCCL on the
        interface of the address Ray reports for this node, then build this rank's step."""
        import ray

        from distca.bootstrap import start_process_group
        from distca.rank import make_rank

        listener = getattr(self, "_listener", None)
        start_process_group(self.cfg.parallel.backend, self.rank, self.world_size, init_method,
                            interface=interface_of(ray.util.get_node_ip_address()),
                            listener=listener if self.rank == 0 else None)
        self.step = make_rank(self.cfg)

    def init_from(self) -> None:
        """A fresh run's start: this rank's shard of ``model.init_from``'s weights (collective)."""
        from distca.roles import init_from_source

        init_from_source(self.step.role, self.cfg.model.init_from)

    def train_step(self, batches: list) -> dict:
        stats = self.step.train_step(batches)
        stats["memory_mb"] = self._peak_memory_mb()
        return stats

    def _peak_memory_mb(self) -> float:
        """This rank's peak memory so far: CUDA allocations on a GPU, else the process's RSS."""
        import torch

        if self.step.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.step.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def peak_flops(self) -> float:
        """This rank's measured matmul FLOP/s: the denominator of the step log's MFU."""
        from distca.profile.flops import measure_peak_flops

        return measure_peak_flops(self.step.device)

    def eval_loss(self, batches: list) -> float:
        return self.step.eval_loss(batches)

    def save(self, directory: str) -> list[dict]:
        """This rank's share of a checkpoint (collective); the entries of the files it wrote."""
        from distca.train.checkpoint import rank_files
        from distca.train.sharded_state import save_state

        save_state(self.step.role, Path(directory))
        return rank_files(Path(directory), self.rank)

    def load(self, step_dir: str, step: int) -> None:
        """This rank's share of the checkpoint of ``step`` saved in any layout (collective)."""
        from distca.train.sharded_state import load_state

        load_state(self.step.role, Path(step_dir))
        self.step.step = step
