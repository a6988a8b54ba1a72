import json
import re
from collections import Counter

import pytest

from distca.cli import main
from distca.evals.tasks import TASKS, generate, score


def count_bytes(text: str) -> int:
    return len(text.encode())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [2000, 5000])
def test_length_is_close_to_target_and_deterministic(task, length):
    a = generate(task, length, 3, seed=7, count_tokens=count_bytes)
    b = generate(task, length, 3, seed=7, count_tokens=count_bytes)
    assert [e.to_chat() for e in a] == [e.to_chat() for e in b]
    for example in a:
        n = count_bytes(f"{example.context}\n\n{example.question}")
        assert 0.85 * length <= n <= length
    assert len({e.context for e in a}) == 3  # examples differ from one another
    c = generate(task, length, 1, seed=8, count_tokens=count_bytes)
    assert c[0].context != a[0].context


def test_niah_multi_key_hides_every_needle_and_asks_one():
    (ex,) = generate("niah", 2000, 1, seed=3, count_tokens=count_bytes, keys=4)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", ex.context)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = re.search(r"number for (\S+) mentioned", ex.question).group(1)
    assert dict(needles)[asked] == ex.answers[0]


def test_vt_chain_resolves_to_the_value():
    (ex,) = generate("vt", 2000, 1, seed=5, count_tokens=count_bytes)
    value = re.search(r"assigned the value (\d+)", ex.question).group(1)
    bindings = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", ex.context))

    def resolve(name):
        target = bindings[name]
        return target if not target.startswith("VAR ") else resolve(target[4:])

    assert sorted(n for n in bindings if resolve(n) == value) == sorted(ex.answers)


def test_cwe_answers_are_the_most_common_words():
    (ex,) = generate("cwe", 3000, 1, seed=2, count_tokens=count_bytes)
    counts = Counter(re.findall(r"\d+\. (\w+)", ex.context))
    top = [w for w, _ in counts.most_common(len(ex.answers))]
    assert sorted(top) == sorted(ex.answers)
    assert min(counts[w] for w in ex.answers) > max(
        c for w, c in counts.items() if w not in ex.answers)


def test_score():
    assert score(["123"], "the number is 123.") == 1.0
    assert score(["a1", "b2"], "only A1 here") == 0.5
    assert score(["x"], "nothing") == 0.0


def test_cli_synth_writes_chat_jsonl(tmp_path, capsys):
    out = tmp_path / "niah.jsonl"
    assert main(["data", "synth", "--task", "niah", "--length", "1000", "--n", "2",
                 "--seed", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    roles = [m["role"] for m in rows[0]["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert rows[0]["answers"][0] in rows[0]["messages"][1]["content"]


@pytest.mark.parametrize("argv, word", [
    (["--task", "niah", "--length", "-5", "--n", "1"], "--length"),
    (["--task", "vt", "--length", "100", "--n", "1", "--keys", "2"], "--keys"),
    (["--task", "cwe", "--length", "100", "--n", "1"], "--length 100"),
    (["--task", "niah", "--length", "5000", "--n", "1", "--keys", "1000"], "--keys 1000"),
])
def test_cli_synth_bad_input(tmp_path, capsys, argv, word):
    code = main(["data", "synth", *argv, "--out", str(tmp_path / "x.jsonl")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and word in captured.err
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_synth_out_is_a_directory(tmp_path, capsys):
    """A directory as --out is a usage error, not a traceback after a stray .tmp is written."""
    code = main(["data", "synth", "--task", "niah", "--length", "300", "--n", "1",
                 "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "is a directory" in captured.err
    assert list(tmp_path.parent.glob(tmp_path.name + ".tmp")) == []


def test_cwe_word_list_grows_past_the_three_syllable_words():
    """Asking for more words than the 70**3 three-syllable ones used to loop forever (a cwe
    haystack of some ten million byte tokens)."""
    import random

    from distca.evals.tasks import _pseudo_words

    words = _pseudo_words(random.Random(0), 200_000)
    assert len(set(words)) == 200_000 and {len(w) for w in words} == {8}
    assert {len(w) for w in _pseudo_words(random.Random(0), 1000)} == {6}  # small lists unchanged
