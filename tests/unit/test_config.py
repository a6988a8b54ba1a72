import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distca.cli import main
from distca.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    for name in ("tiny.yaml", "llama3-8b-128k.yaml", "codellama-34b-512k.yaml",
                 "qwen2.5-7b-focusft.yaml"):
        assert name in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert cfg.model.num_attention_heads % cfg.parallel.tp == 0


def test_preset_fills_shape_and_recipe_overrides_it():
    cfg = load_config(ROOT / "recipes/codellama-34b-512k.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_kv_heads) == (48, 8192, 8)
    assert cfg.model.max_position_embeddings == 524288  # set by the recipe over the preset


def test_override_wins(tmp_path):
    cfg = load_config(ROOT / "recipes/tiny.yaml", ["model.num_layers=3", "cad.tolerance=0.2"])
    assert cfg.model.num_layers == 3 and cfg.cad.tolerance == 0.2


def _error(recipe, overrides):
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.no_such_key=1", "model.no_such_key"),
        ("nosection.x=1", "nosection"),
        ("model.num_layers=abc", "model.num_layers"),
        ("cad.tolerance=-0.1", "cad.tolerance"),
        ("data.pack_tokens=300", "data.pack_tokens"),  # does not divide dp * tokens_per_rank
        ("parallel.tp=3", "parallel.tp"),
        ("model.num_kv_heads=3", "model.num_kv_heads"),
        ("attention.backend=cuda_magic", "attention.backend"),
        ("model.preset=gpt5", "model.preset"),
        ("trainer.steps=0", "trainer.steps"),
        # NaN slips through every `<`/`>` range check; each bound names its own key
        ("optim.lr=nan", "optim.lr"),
        ("optim.min_lr=inf", "optim.min_lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.beta1=1.5", "optim.beta1"),
        ("optim.eps=0", "optim.eps"),
        ("trainer.seed=-1", "trainer.seed"),
        ("ray.num_gpus_per_worker=-1", "ray.num_gpus_per_worker"),
        ("ray.num_cpus_per_worker=0", "ray.num_cpus_per_worker"),  # traceback from Ray before
        ("focusft.alpha=0", "focusft.alpha"),
        ("focusft.inner_backtrack=-1", "focusft.inner_backtrack"),
        ("focusft.targets=[down_proj,down_proj]", "focusft.targets"),
        ("attention.mask=glm", "attention.mask"),  # glm needs chat data's turns
        ("attention.mask=bidirectional", "attention.mask"),
    ],
)
def test_bad_values_name_key_and_file(override, key):
    message = _error(ROOT / "recipes/tiny.yaml", [override])
    assert key in message and "tiny.yaml" in message


def test_old_fast_weight_target_names_fail_naming_the_new_ones():
    message = _error(ROOT / "recipes/tiny-focusft.yaml", ["focusft.targets=[linear_fc1]"])
    assert "focusft.targets" in message and "gate_proj, up_proj, down_proj" in message


@pytest.mark.parametrize("overrides, mask", [
    ([], "glm"),  # FocuSFT on chat data: the GLM turn mask in both loops
    (["focusft.enabled=false"], "causal"),  # SFT: the ordinary causal baseline
    (["attention.mask=causal"], "causal"),  # an explicit choice wins
    (["focusft.enabled=false", "attention.mask=glm"], "glm"),
    (["data.kind=synthetic"], "causal"),  # no turns to mask by
])
def test_attention_mask_defaults_and_is_recorded_resolved(overrides, mask):
    from distca.config import to_yaml

    cfg = load_config(ROOT / "recipes/tiny-focusft.yaml", overrides)
    assert cfg.attention.mask.value == mask
    assert yaml.safe_load(to_yaml(cfg))["attention"]["mask"] == mask


def test_focusft_without_targets_fails_up_front():
    """It used to fail in the first step: 'inputs to grad() cannot be empty'."""
    message = _error(ROOT / "recipes/tiny-focusft.yaml", ["focusft.targets=[]"])
    assert "focusft.targets" in message and "tiny-focusft.yaml" in message


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_dedicated_servers_with_tp_or_pp_fail_up_front(layout):
    message = _error(ROOT / "recipes/tiny.yaml",
                     ["cad.server_mode=dedicated", "cad.num_dedicated_servers=1", layout])
    assert "cad.server_mode" in message and "tiny.yaml" in message


def test_bad_recipe_file_content(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"preset": "tiny", "hidden_size": "wide"}}))
    message = _error(bad, [])
    assert "model.hidden_size" in message and "bad.yaml" in message
    unset = tmp_path / "unset.yaml"
    unset.write_text("model:\n  num_layers: 2\n")
    assert "unset.yaml" in _error(unset, [])
    assert "no such recipe" in _error(tmp_path / "absent.yaml", [])


def test_cli_config_show(capsys):
    assert main(["config", "show", str(ROOT / "recipes/tiny.yaml"), "model.num_layers=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["num_layers"] == 3
    assert shown["parallel"]["dp"] == 2


def test_cli_bad_key_exits_2(capsys):
    code = main(["config", "show", str(ROOT / "recipes/tiny.yaml"), "model.no_such_key=1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "model.no_such_key" in captured.err


def test_console_script_help_and_exit_code():
    exe = Path(sys.executable).parent / "distca"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "config" in out
    bad = subprocess.run([exe, "config", "show", str(ROOT / "recipes/tiny.yaml"), "x.y=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "x.y" in bad.stderr


def test_scheduler_layer_never_imports_torch():
    code = "import distca.scheduler, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("overrides, key", [
    (["data.synth.task=nope"], "data.synth.task"),
    (["data.synth.length=0"], "data.synth.length"),
    (["data.paths=[chat.jsonl]"], "data.paths"),  # synth makes its data: a file is a mistake
    (["trainer.eval_interval=5"], "trainer.eval_interval"),  # nothing to evaluate on
    (["data.kind=chat", "data.paths=a.jsonl", "data.eval_paths=b.jsonl"], "data.eval_paths"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode"),
])
def test_new_sections_name_the_bad_key(overrides, key):
    message = _error(ROOT / "recipes/tiny-focusft.yaml", overrides)
    assert f": {key}:" in message and "tiny-focusft.yaml" in message


def test_tiny_focusft_runs_out_of_the_box_and_recipes_are_found_by_name(tmp_path, monkeypatch):
    """The recipe used to point at data/tiny-focusft.jsonl, which a fresh clone lacks; an
    installed distca finds its shipped recipes from any directory."""
    from distca.data import make_dataset

    monkeypatch.chdir(tmp_path)  # no recipes/ and no data/ here
    cfg = load_config("recipes/tiny-focusft.yaml", ["data.synth.count=4"])
    assert cfg.data.kind.value == "synth" and cfg.data.paths == []
    batch = make_dataset(cfg).step_batches(1)[0]
    assert batch.turn_lengths is not None and (batch.labels != -100).any()
    assert load_config("tiny.yaml").model.num_layers == 4
    assert "shipped recipe" in _error("nope.yaml", [])


def test_cli_usage_hints(capsys):
    """`--trainer.steps=10` used to be argparse's bare 'unrecognized arguments'; train --help
    now names the config sections and how to see every key; every eval flag explains itself."""
    assert main(["train", "recipes/tiny.yaml", "--trainer.steps=10"]) == 2
    assert "write trainer.steps=10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "distca config show RECIPE" in out
    assert all(f"  {section} " in out for section in ("model", "data", "trainer", "logging"))
    from distca.cli import build_parser

    subcommands = build_parser()._subparsers._group_actions[0].choices
    for action in subcommands["eval"]._actions:
        assert action.help, f"eval {action.dest} has no help"


def test_inner_backtracking_with_pipeline_stages_fails_up_front():
    message = _error(ROOT / "recipes/tiny-focusft.yaml",
                     ["focusft.inner_backtrack=2", "parallel.pp=2"])
    assert "focusft.inner_backtrack" in message and "parallel.pp=1" in message
