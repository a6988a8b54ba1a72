"""Input that used to be accepted and then trained on garbage, hung or raised a traceback."""

import time

import pytest

from distca.config import ConfigError, load_config
from distca.data.text import read_documents


@pytest.mark.parametrize("content, offset", [
    ("café crème".encode("latin-1"), 3),  # latin-1, not UTF-8
    (bytes(range(128, 256)) * 4, 0),  # random-looking bytes without NUL
])
def test_text_data_must_be_utf8_and_the_byte_is_named(tmp_path, content, offset):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: not valid UTF-8 at byte {offset}"):
        read_documents([str(path)])


def test_binary_recipe_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model:\n  preset: tiny\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=f"{recipe}: <recipe>: not UTF-8 text \\(byte 22"):
        load_config(recipe)


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\nmodel: {preset: tiny}\n")
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(recipe)
    assert time.monotonic() - start < 10


def test_a_section_that_is_not_a_mapping_names_its_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: 5\n")
    with pytest.raises(ConfigError, match=f"{recipe}: model: must be a mapping of keys, got 5"):
        load_config(recipe)
