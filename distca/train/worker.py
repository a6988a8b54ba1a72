"""One rank of the training job, run as a Ray actor.

The driver starts one :class:`RankWorker` per rank, then calls :meth:`setup` on all of them
at once: each joins torch.distributed (gloo on CPU, nccl on GPU) and builds the
:class:`distca.engine.Engine`. Afterwards the driver sends every rank the same micro-batches
per step. Ray is the control plane only; tensors between ranks go over torch.distributed.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from pathlib import Path

from distca.config import DistBackend, DistcaConfig


def world_layout(cfg: DistcaConfig) -> list[str]:
    """The role of every rank: workers first, then dedicated attention servers."""
    p, c = cfg.parallel, cfg.cad
    servers = c.num_dedicated_servers if c.server_mode.value == "dedicated" else 0
    return ["worker"] * (p.dp * p.tp * p.pp) + ["attention_server"] * servers


class RankWorker:
    def __init__(self, cfg: DistcaConfig, rank: int, world_size: int, role: str):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.role = role
        self.engine = None
        # megatron-core announces its torch-native fallbacks once per process (design §8)
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "role": self.role, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def free_port(self, host: str) -> int:
        """A TCP port free on this node, for the multi-node rendezvous (rank 0 only)."""
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def setup(self, init_method: str, loopback: bool) -> None:
        import torch
        import torch.distributed as dist

        if loopback:
            # gloo otherwise listens on the address the host name resolves to
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        backend = self.cfg.parallel.backend
        if backend is DistBackend.auto:
            backend = DistBackend.nccl if torch.cuda.is_available() else DistBackend.gloo
        dist.init_process_group(backend.value, init_method=init_method, rank=self.rank,
                                world_size=self.world_size,
                                timeout=datetime.timedelta(minutes=10))
        from distca.engine import Engine
        from distca.focusft import FocusftEngine

        self.engine = (FocusftEngine if self.cfg.focusft.enabled else Engine)(self.cfg)

    def train_step(self, batches: list) -> dict:
        return self.engine.train_step(batches)

    def eval_loss(self, batches: list) -> float:
        return self.engine.eval_loss(batches)

    def save(self, directory: str) -> dict:
        from distca.train.checkpoint import write_shard

        return write_shard(Path(directory), self.rank, self.engine.state_dict())

    def load(self, step_dir: str) -> None:
        from distca.train.checkpoint import read_shard

        self.engine.load_state_dict(read_shard(Path(step_dir), self.rank))
