"""One rank of the training job, run as a Ray actor.

The driver starts one :class:`RankWorker` per rank, then calls :meth:`setup` on all of them
at once: each joins torch.distributed (gloo on CPU, nccl on GPU) and builds the
:class:`distca.engine.Engine`. Afterwards the driver sends every rank the same micro-batches
per step. Ray is the control plane only; tensors between ranks go over torch.distributed.

Nothing listens on every interface: the multi-node rendezvous store listens on rank 0's node
address (a socket bound here and handed to torch's TCPStore, which would otherwise bind
0.0.0.0), and gloo and NCCL use the network interface of the address Ray reports for the node
(by default they take whatever the host name resolves to).
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from pathlib import Path

from distca.config import DistBackend, DistcaConfig


def interface_of(address: str) -> str | None:
    """The network interface holding ``address`` on this machine, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def join_process_group(init_method: str, rank: int, world_size: int, backend: str, node: str,
                       listener: socket.socket | None = None) -> None:
    """torch.distributed over ``init_method`` (``file://`` or ``tcp://HOST:PORT``, where rank 0
    passes the ``listener`` bound by :meth:`RankWorker.listen`), with gloo/NCCL on the
    interface of ``node``, the address Ray reports for this node."""
    import torch.distributed as dist

    interface = interface_of(node)
    if interface is not None:  # the knobs gloo and NCCL read: there is no argument for it
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ["NCCL_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(minutes=10)
    if not init_method.startswith("tcp://"):
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timeout)
        return
    host, port = init_method[len("tcp://"):].rsplit(":", 1)
    store = dist.TCPStore(host.strip("[]"), int(port), world_size, is_master=rank == 0,
                          timeout=timeout,
                          master_listen_fd=listener.detach() if listener is not None else None)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


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

    def listen(self, host: str) -> int:
        """Rank 0: bind the rendezvous store's socket to ``host`` (this node's address) now,
        so its port can be sent to every rank; returns the port."""
        self._listener = socket.create_server((host, 0))
        return self._listener.getsockname()[1]

    def setup(self, init_method: str) -> None:
        import ray
        import torch

        backend = self.cfg.parallel.backend
        if backend is DistBackend.auto:
            backend = DistBackend.nccl if torch.cuda.is_available() else DistBackend.gloo
        join_process_group(init_method, self.rank, self.world_size, backend.value,
                           ray.util.get_node_ip_address(), getattr(self, "_listener", None))
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
