"""One model, one name (issue 27): a folder spelled two ways (``a``, ``a/``, relative, absolute,
through a link) and the zoo's converted folder of a zoo model are each one model, decided
before anything runs; the atlas runs such a list once per model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from interp.errors import UserError
from interp.runs.store import Store
from tests.tiny import run_cli


def test_spellings_of_one_folder_are_one_name(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interp.model.loading import resolve_model_name

    link = tmp_path / "link"
    link.symlink_to(tiny_folder, target_is_directory=True)
    monkeypatch.chdir(tiny_folder.parent)
    spellings = [str(tiny_folder), f"{tiny_folder}/", tiny_folder.name, f"./{tiny_folder.name}/", str(link),
                 f"{tiny_folder}/../{tiny_folder.name}"]
    # The expected name, worked out with os.path alone: the absolute path, links resolved.
    expected = os.path.realpath(tiny_folder)
    assert {resolve_model_name(s) for s in spellings} == {expected}


def test_the_zoo_s_folder_of_a_model_is_that_zoo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interp.model.loading import resolve_model_name

    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    assert resolve_model_name(str(converted)) == "smollm2-135m"
    assert resolve_model_name(f"{converted}/") == "smollm2-135m"
    assert resolve_model_name("smollm2-135m") == "smollm2-135m"
    assert resolve_model_name("someorg/somemodel") == "someorg/somemodel"  # a hub id, as given
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_name(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model_name(str(tmp_path / "weights.bin"))


def test_the_atlas_runs_one_folder_given_three_ways_once(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tiny_folder.parent)
    ws = tmp_path / "ws"
    models = ",".join([str(tiny_folder), f"{tiny_folder}/", tiny_folder.name])
    code, out, err = run_cli(capsys, ["atlas", "--models", models, "-d", "induction", "-w", str(ws), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert list(doc["models"]) == [os.path.realpath(tiny_folder)]
    assert "one model" in err
    with Store(ws) as s:
        runs = s.runs()
    # One induction run, and the atlas's own run of that one model.
    assert list(runs["detector"]) == ["induction", "atlas"]
    assert json.loads(str(runs["params_json"].iloc[1]))["models"] == [os.path.realpath(tiny_folder)]
