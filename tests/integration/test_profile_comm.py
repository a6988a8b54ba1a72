import json
import subprocess
import sys

import pytest

from distca.cli import main
from distca.commands.profile import parse_sizes
from distca.errors import UsageError


def test_parse_sizes():
    assert parse_sizes("64K, 1M,512,2GB") == [65536, 1 << 20, 512, 2 << 30]
    for bad in ("abc", "0", "-4K", "1.5M", " 4kx"):
        with pytest.raises(UsageError, match="--sizes") as info:
            parse_sizes(bad)
        assert repr(bad.strip()) in str(info.value)  # the item as the user typed it


def test_profile_comm_runs_and_parses(tmp_path):
    """--json prints the result and --out writes the same JSON, like profile attention/train."""
    table = tmp_path / "sub" / "comm.json"
    out = subprocess.run([sys.executable, "-m", "distca.cli", "profile", "comm", "--world", "2",
                          "--sizes", "8K,256K", "--iters", "2", "--json", "--out", str(table)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    result = json.loads(out)
    assert json.loads(table.read_text()) == result
    assert result["backend"] == "gloo" and result["world"] == 2
    assert [r["bytes"] for r in result["rows"]] == [8192, 262144]
    assert all(r["seconds"] > 0 and r["bus_GBps"] > 0 for r in result["rows"])


def test_profile_comm_bad_world(capsys):
    assert main(["profile", "comm", "--world", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--world" in captured.err
