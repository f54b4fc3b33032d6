"""Config files: paths inside a YAML file are relative to that file, wherever qfinal runs."""

from __future__ import annotations

from pathlib import Path

from qfinal.config import build_config


def test_adapter_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "run.yaml"
    config.write_text(
        "adapters:\n  - ./lora\n  - path: ../other/lora2\n    merge: true\n  - path: /abs/lora3\n  - path: ~/lora4\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = build_config(config)
    assert [a.path for a in cfg.adapters] == [
        str(folder / "lora"),
        str(folder / "../other/lora2"),
        "/abs/lora3",
        str(Path("~/lora4").expanduser()),
    ]
    assert [a.merge for a in cfg.adapters] == [False, True, False, False]


def test_adapter_paths_given_as_overrides_stay_relative_to_the_working_directory(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("adapters:\n  - ./lora\n")
    cfg = build_config(config, adapters=[{"path": "mine"}])
    assert [a.path for a in cfg.adapters] == ["mine"]
