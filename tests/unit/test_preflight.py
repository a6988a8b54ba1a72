"""Resource and range checks of ``distca train`` before Ray starts (no Ray: fast)."""

import time

import pytest
from train_helpers import run_distca

from distca.config import ConfigError, load_config
from distca.train import preflight


@pytest.mark.parametrize("override, key", [
    ("parallel.dp=1000", "parallel.dp"),
    ("model.hidden_size=65536", "model.hidden_size"),
    ("data.tokens_per_rank=1000000000000", "data.tokens_per_rank"),
    ("data.micro_batches=10000000", "data.micro_batches"),
    ("trainer.seed=18446744073709551616", "trainer.seed"),
    ("parallel.backend=nccl", "parallel.backend"),
    ("attention.backend=flash", "attention.backend"),
    ("data.max_length=1000000000000", "data.max_length"),
])
def test_impossible_runs_are_refused_naming_the_key(override, key):
    cfg = load_config("recipes/tiny.yaml", [override])
    with pytest.raises(ConfigError, match=f"^recipes/tiny.yaml: {key}: "):
        preflight.check_local(cfg, "recipes/tiny.yaml")


def test_no_fake_gpus(monkeypatch):
    cfg = load_config("recipes/tiny.yaml", ["ray.num_gpus_per_worker=1"])
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 0)
    with pytest.raises(ConfigError, match="ray.num_gpus_per_worker: this machine has no CUDA"):
        preflight.check_local(cfg, "r")
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 1)  # 2 ranks, 1 GPU
    with pytest.raises(ConfigError, match="need 2 GPUs; this machine has 1"):
        preflight.check_local(cfg, "r")


def test_the_cpu_recipes_pass_and_a_joined_cluster_is_checked_against_its_resources():
    for recipe in ("recipes/tiny.yaml", "recipes/tiny-focusft.yaml"):
        preflight.check_local(load_config(recipe), recipe)
    cfg = load_config("recipes/tiny.yaml", ["ray.num_gpus_per_worker=1"])
    with pytest.raises(ConfigError, match="ray.num_gpus_per_worker: 2 ranks x 1 need 2 GPUs; "
                                          "the cluster has 1"):
        preflight.check_cluster(cfg, "r", {"CPU": 64.0, "GPU": 1.0})
    cfg = load_config("recipes/tiny.yaml", ["parallel.dp=64"])
    with pytest.raises(ConfigError, match="parallel.dp: this run needs about 35.2 GiB of memory "
                                          "on the cluster's nodes .* 16.0 GiB are available"):
        preflight.check_cluster(cfg, "r", {"CPU": 64.0, "memory": 16 * 2**30})


def test_dp_1000_exits_2_within_seconds_without_starting_ray(tmp_path):
    start = time.monotonic()
    out = run_distca("train", "recipes/tiny.yaml", "parallel.dp=1000",
                     f"trainer.run_dir={tmp_path}/r")
    assert out.returncode == 2 and "parallel.dp: 1000 ranks" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
    assert time.monotonic() - start < 30  # under load; alone it takes well under 2 s
    assert not (tmp_path / "r").exists()  # stopped before the run directory, made before Ray


def test_step_timeout_is_sized_from_the_slowest_step():
    from distca.train.watchdog import step_timeout

    assert step_timeout(0.0, None) == 600.0  # a group's first step warms up
    assert step_timeout(20.0, None) == 600.0
    assert step_timeout(0.0, 2.0) == 60.0 and step_timeout(0.0, 30.0) == 300.0
    assert step_timeout(20.0, 30.0) == 20.0
    with pytest.raises(ConfigError, match="trainer.step_timeout_s: must be >= 0"):
        preflight.check_local(load_config("recipes/tiny.yaml", ["trainer.step_timeout_s=-1"]), "r")
    with pytest.raises(ConfigError, match="trainer.call_timeout_s: must be >= 0"):
        preflight.check_local(load_config("recipes/tiny.yaml", ["trainer.call_timeout_s=-1"]), "r")
