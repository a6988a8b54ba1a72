"""Every socket distca opens for a run listens on the node's own address, never 0.0.0.0."""

import os
import re
import socket
import subprocess
from pathlib import Path

import torch.distributed as dist

from distca.bootstrap import start_process_group
from distca.config import DistBackend
from distca.train.worker import interface_of

REPO = Path(__file__).resolve().parents[2]


def listening(pid: int) -> list[str]:
    out = subprocess.run(["ss", "-tlnp"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_tcp_rendezvous_and_gloo_listen_on_the_node_address_only():
    before = set(listening(os.getpid()))  # what earlier tests of this process left open
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    start_process_group(DistBackend.gloo, 0, 1, f"tcp://127.0.0.1:{port}",
                        interface=interface_of("127.0.0.1"), listener=listener)
    try:
        addresses = [a for a in listening(os.getpid()) if a not in before]
        assert f"127.0.0.1:{port}" in addresses  # the store, on the socket bound for it
        assert addresses and all(re.match(r"127\.0\.0\.1:\d+$", a) for a in addresses), addresses
        assert os.environ["GLOO_SOCKET_IFNAME"] == interface_of("127.0.0.1") == "lo"
    finally:
        dist.destroy_process_group()


def test_cluster_files_keep_the_dashboard_off_public_interfaces():
    for name in ("ray-up.yaml", "rayjob.yaml", "slurm.sh"):
        text = (REPO / "cluster" / name).read_text()
        assert "0.0.0.0" not in text, name
    readme = (REPO / "cluster" / "README.md").read_text()
    assert "ssh -L 8265:" in readme and "port-forward" in readme and "RAY_AUTH_MODE" in readme
