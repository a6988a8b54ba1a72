"""Cluster launch files parse; a loopback Ray head accepts ``ray job submit -- distca train``."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import REPO, distca_cmd, metrics

from distca.profile.comm import free_port

CLUSTER = REPO / "cluster"


def test_ray_up_yaml_describes_a_gpu_cluster():
    spec = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert spec["head_node_type"] in spec["available_node_types"]
    assert any("ray start --head" in c for c in spec["head_start_ray_commands"])
    assert any("ray start --address" in c for c in spec["worker_start_ray_commands"])
    workers = spec["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] <= spec["max_workers"]


def test_rayjob_manifest_runs_distca_train():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("distca train recipes/")
    recipe = job["spec"]["entrypoint"].split()[2]
    assert (REPO / recipe).is_file()
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1


def test_slurm_script_is_valid_bash_and_submits_a_job():
    script = CLUSTER / "slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and "start --head" in text and "job submit" in text


def _fake_slurm(tmp_path: Path, gpus_seen: list[int]) -> tuple[dict, Path]:
    """srun/scontrol/sleep and a ray CLI (with distca beside it) that log their arguments;
    ``ray status`` reports ``gpus_seen`` in turn (the last one from then on)."""
    fake, env_bin, log = tmp_path / "bin", tmp_path / "env" / "bin", tmp_path / "calls.log"
    fake.mkdir()
    env_bin.mkdir(parents=True)
    counts = " ".join(str(g) for g in gpus_seen)
    scripts = {
        fake / "scontrol": 'printf "n1\\nn2\\n"',
        fake / "sleep": "true",
        fake / "srun": f'echo "srun $*" >> {log}; case "$*" in *hostname*) echo 10.0.0.1;; esac',
        env_bin / "distca": "true",
        env_bin / "ray": f"""echo "ray $*" >> {log}
if [ "$1" = status ]; then
  set -- {counts}; n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n
  shift $(( n < $# - 1 ? n : $# - 1 )); echo " 0.0/$1.0 GPU"
fi""",
    }
    for path, body in scripts.items():
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", RAY=str(env_bin / "ray"),
               SLURM_JOB_NODELIST="n[1-2]", SLURM_CPUS_PER_TASK="96", SLURM_SUBMIT_DIR=str(REPO))
    return env, log


def test_slurm_script_waits_for_every_gpu_and_submits_from_the_shared_checkout(tmp_path):
    env, log = _fake_slurm(tmp_path, [8, 8, 16])
    done = subprocess.run(["bash", str(CLUSTER / "slurm.sh"), "recipes/tiny.yaml",
                           "trainer.steps=3"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    submit = [c for c in calls if c.startswith("ray job submit")]
    assert len(submit) == 1 and calls.index(submit[0]) > max(
        i for i, c in enumerate(calls) if c.startswith("ray status"))
    # the job runs where Ray started (the shared checkout), with the distca beside that ray:
    # an uploaded --working-dir copy put the default run directory in a node-local temp dir
    assert "--working-dir" not in submit[0]
    assert submit[0].endswith(f"-- {tmp_path}/env/bin/distca train recipes/tiny.yaml "
                              f"trainer.steps=3")
    assert sum(c.startswith("ray status") for c in calls) == 3
    assert all("--cpus-per-task=96" in c for c in calls if "ray start" in c)


def test_slurm_script_fails_when_nodes_do_not_join(tmp_path):
    env, log = _fake_slurm(tmp_path, [8])
    done = subprocess.run(["bash", str(CLUSTER / "slurm.sh"), "recipes/tiny.yaml"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "only 8 of 16 GPUs joined" in done.stderr
    assert "ray job submit" not in log.read_text()


def test_readme_shows_job_submit():
    assert "ray job submit --address" in (CLUSTER / "README.md").read_text()
    assert "distca train recipes/llama3-8b-128k.yaml" in (CLUSTER / "README.md").read_text()


def _listener(host: str, reply: bytes | None):
    """A one-thread TCP server on ``host``: answers every connection with ``reply`` (an
    HTTP/1.0 response, as the dashboard sends) or with nothing (a non-HTTP service)."""
    import socket
    import threading

    server = socket.socket()
    server.bind((host, 0))
    server.listen(8)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(1024)
                    if reply:
                        conn.sendall(reply)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1", "is not HOST:PORT"),
    ("http://127.0.0.1:8265", "is a URL"),
    ("127.0.0.1:1", "does not answer"),
])
def test_ray_address_mistakes_are_named(address, says):
    from distca.train.errors import ClusterError
    from distca.train.ray_cluster import _check_answers

    with pytest.raises(ClusterError, match=says):
        _check_answers(address)


def test_ray_address_of_the_dashboard_fails_fast():
    """ray.init on the dashboard's HTTP port waited forever for a GCS."""
    from distca.train.errors import ClusterError
    from distca.train.ray_cluster import _check_answers

    server, port = _listener("127.0.0.1", b"HTTP/1.0 200 OK\r\n\r\n")
    with server, pytest.raises(ClusterError, match="HTTP server .*ray job submit"):
        _check_answers(f"127.0.0.1:{port}")


def test_joining_a_loopback_only_head_keeps_ray_on_loopback(monkeypatch):
    """Ray rewrites a 127.0.0.1 address to the machine's address, where a loopback-only head
    does not listen (`distca train ray.address=127.0.0.1:PORT` hung) unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before ``ray`` is imported."""
    import ray

    from distca.train import ray_cluster

    server, port = _listener("127.0.0.1", None)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    seen = {}

    def fake_init(**kwargs):
        seen.update(env=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), **kwargs)

    monkeypatch.setattr(ray, "init", fake_init)
    with server:
        assert ray_cluster.connect(f"127.0.0.1:{port}", 1.0) is False
    assert seen["address"] == f"127.0.0.1:{port}" and seen["env"] == "0"


def test_joining_a_head_on_every_interface_keeps_rays_default(monkeypatch):
    """A real head listens on the machine's address too: 127.0.0.1 there is left to Ray."""
    from distca.train import ray_cluster

    machine = ray_cluster._machine_ip()
    if machine is None or ray_cluster.is_loopback(machine):
        pytest.skip("this machine has no non-loopback address")
    server, port = _listener("0.0.0.0", None)
    with server:
        assert ray_cluster._check_answers(f"127.0.0.1:{port}") is False


def pids_using(temp_dir: str) -> list[int]:
    """Processes whose command line names our private Ray temp dir: the head we started."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_to_a_loopback_head(tmp_path):
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="dcray-", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    start = subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--num-cpus=3", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        run_dir = tmp_path / "job-run"
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
             "--", *distca_cmd("train", "recipes/tiny.yaml", "trainer.steps=3",
                               f"trainer.run_dir={run_dir}")],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=480)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "succeeded" in job.stdout
        assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    finally:
        for pid in pids_using(temp_dir):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in pids_using(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
