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

import os
import socket

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


def _check_answers(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast when ``host:port`` does not accept connections (ray.init would hang)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ClusterError(f"ray.address {address!r} does not answer ({exc}); start the "
                           f"cluster first (`ray start --head`) or leave ray.address unset "
                           f"to run locally") from None


def connect(address: str | None, num_cpus: float, num_gpus: float = 0.0) -> bool:
    """Join ``address`` or start a private local cluster; returns True when started here."""
    if address is None:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        import ray

        # Ray gives its raylet a fixed 30 s to register; on a loaded machine one retry helps.
        for attempt in range(2):
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                         num_cpus=max(1, int(num_cpus + 0.999)), num_gpus=int(num_gpus),
                         logging_level="WARNING", log_to_driver=True)
                return True
            except Exception as exc:
                ray.shutdown()  # stops whatever part of the cluster did start
                if attempt == 1:
                    raise ClusterError(f"could not start a local Ray cluster: {exc}") from exc
    _check_answers(address)
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
