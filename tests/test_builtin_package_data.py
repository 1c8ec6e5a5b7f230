"""The built-in data pools are package data (src/ftsafety/builtin/*.json), not Python literals."""

from __future__ import annotations

import ast
import fnmatch
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "ftsafety"
DATA_FILES = sorted((PKG / "builtin").glob("*.json"))


def test_data_files_parse_and_ship_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ftsafety"]
    assert DATA_FILES
    for path in DATA_FILES:
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path.name
        rel = path.relative_to(PKG).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in the package-data of pyproject.toml"


def test_every_data_file_is_read_by_builtin_data():
    source = (PKG / "builtin_data.py").read_text()
    for path in DATA_FILES:
        assert f'_load("{path.stem}")' in source, path.name


def test_no_data_literal_over_100_lines_in_src():
    big = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Dict, ast.Set)) and node.end_lineno - node.lineno >= 100:
                big.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not big, f"move these literals to package data files: {big}"
