"""Joining torch.distributed: the one bootstrap of training, profiling and local helpers.

Light on purpose (torch only): ``distca profile comm`` and local helpers join a process group
without importing megatron (:mod:`distca.mesh` builds the groups on top of it).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from distca.config import DistBackend


def start_process_group(backend: DistBackend, rank: int, world: int, init_method: str | None,
                        interface: str | None = None, listener: socket.socket | None = None,
                        timeout_s: float = 600.0) -> None:
    """Join torch.distributed: the one bootstrap of training, profiling and local helpers.

    ``backend`` auto picks NCCL with CUDA, gloo otherwise. ``init_method`` None means a world of
    one rank over an in-memory store (nothing listens on a socket); else ``file://…`` or
    ``tcp://HOST:PORT``, where rank 0 may pass ``listener``, a socket already bound to its own
    node's address, for the rendezvous store (torch's TCPStore would otherwise listen on every
    interface). ``interface``: the network interface gloo and NCCL use (``lo`` for local runs,
    the interface of the node's address on a cluster); they otherwise take whatever the host
    name resolves to, and this variable is their only knob for it.
    """
    if backend is DistBackend.auto:
        backend = DistBackend.nccl if torch.cuda.is_available() else DistBackend.gloo
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ["NCCL_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method is None:
        if world != 1:
            raise ValueError(f"a world of {world} ranks needs an init_method")
        dist.init_process_group(backend.value, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return
    if listener is None:
        dist.init_process_group(backend.value, init_method=init_method, rank=rank,
                                world_size=world, timeout=timeout)
        return
    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    store = dist.TCPStore(host.strip("[]"), int(port), world, is_master=True, timeout=timeout,
                          master_listen_fd=listener.detach())
    dist.init_process_group(backend.value, store=store, rank=rank, world_size=world,
                            timeout=timeout)
