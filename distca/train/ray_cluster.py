"""Start a local Ray cluster bound to loopback, or join a given one.

Ray reads some settings from the environment of the processes it starts, and the driver reads
them when ``ray`` is first imported, so for a local cluster they are set in this process
before ``ray`` is imported (and inherited by the GCS, raylet and workers it starts):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: every Ray socket uses 127.0.0.1; without it Ray
  advertises the machine's non-loopback address even with ``_node_ip_address``.
- ``RAY_AUTH_MODE=disabled``: a private single-machine cluster needs no token.
- ``RAY_USAGE_STATS_ENABLED=0``: usage reporting probes a cloud metadata address.
- ``RAY_worker_niceness=0``: Ray starts workers at niceness 15; here the rank actors are the
  job itself and should run at normal priority, like processes torchrun would start.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from distca.train import leftovers
from distca.train.errors import ClusterError

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",
}


def resolve_address(configured: str | None) -> str | None:
    """The cluster to join: ``ray.address``, else the one a ``ray job submit`` driver runs in
    (Ray sets ``RAY_ADDRESS`` for job drivers), else None (start a local cluster)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def _split(address: str, source: str) -> tuple[str, int]:
    """``host:port`` of a GCS address; a URL or a missing port is named as the mistake."""
    if "://" in address:
        raise ClusterError(
            f"{source} {address!r} is a URL; it takes the Ray cluster's GCS address HOST:PORT "
            f"(`ray start --head --port`, 6379 by default). The dashboard's http:// address "
            f"(port 8265) is for `ray job submit --address URL -- distca train ...`"
            + ("; unset RAY_ADDRESS to train on a local cluster" if source == "RAY_ADDRESS"
               else ""))
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{source} {address!r} is not HOST:PORT (the GCS port of "
                           f"`ray start --head --port`, 6379 by default)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _machine_ip() -> str | None:
    """The address Ray puts in place of a loopback one (the route to the outside); sends no
    packet."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))
            return s.getsockname()[0]
    except OSError:
        return None


def _answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_answers(address: str, source: str = "ray.address", timeout_s: float = 3.0) -> bool:
    """Fail fast when ``host:port`` is not a Ray GCS (ray.init would hang on a closed port or
    on the dashboard's HTTP port); returns True for a loopback-only head, which Ray can only
    be joined at with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else it rewrites 127.0.0.1 to
    the machine's address, where nothing listens, and waits forever)."""
    if address == "auto" or address.startswith("ray://"):
        return False
    host, port = _split(address, source)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.settimeout(timeout_s)
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                reply = conn.recv(16)
            except OSError:
                reply = b""
    except OSError as exc:
        raise ClusterError(f"{source} {address!r} does not answer ({exc}); start the "
                           f"cluster first (`ray start --head`) or leave ray.address unset "
                           f"to run locally") from None
    if reply.startswith(b"HTTP/"):
        raise ClusterError(
            f"{source} {address!r} is an HTTP server (the dashboard?), not the Ray GCS; "
            f"give the GCS port of `ray start --head --port` (6379 by default), or submit "
            f"to the dashboard with `ray job submit --address http://{address} -- distca train "
            f"...`")
    if not is_loopback(host):
        return False
    machine = _machine_ip()
    return machine is None or is_loopback(machine) or not _answers(machine, port, timeout_s)


def connect(address: str | None, num_cpus: float) -> bool:
    """Join ``address`` or start a private local cluster; returns True when started here.
    A local cluster gets ``num_cpus`` logical CPUs and the GPUs Ray detects, never more."""
    if address is None:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        import ray

        for line in leftovers.clean_up_dead_drivers():
            print(f"distca: {line}", file=sys.stderr)
        # Ray gives its raylet a fixed 30 s to register; on a loaded machine one retry helps.
        for attempt in range(2):
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                         num_cpus=max(1, int(num_cpus + 0.999)),
                         logging_level="WARNING", log_to_driver=True)
                node = getattr(ray._private.worker, "_global_node", None)  # no public API
                if node is not None:
                    leftovers.register(node.get_session_dir_path())
                return True
            except Exception as exc:
                ray.shutdown()  # stops whatever part of the cluster did start
                if attempt == 1:
                    raise ClusterError(f"could not start a local Ray cluster: {exc}") from exc
    source = "ray.address" if os.environ.get("RAY_ADDRESS") != address else "RAY_ADDRESS"
    if _check_answers(address, source):
        # before ``ray`` is imported: it reads the setting once
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    except Exception as exc:
        raise ClusterError(f"could not join the Ray cluster at {address!r}: {exc}") from exc
    return False


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    leftovers.unregister()
