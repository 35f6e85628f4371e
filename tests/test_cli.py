"""The CLI and the README's commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from vladapt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README.md lacks the {marker} block"
    return m.group(1).strip()


def vladapt_invocations(command: str) -> list[list[str]]:
    return [shlex.split(part.strip())[1:] for part in command.split("&&") if part.strip().startswith(".venv/bin/vladapt")]


def test_readme_has_setup_main_and_test_commands():
    main_cmd, test_cmd = readme_block("main-command"), readme_block("test-command")
    for cmd in (main_cmd, test_cmd):
        assert cmd.startswith("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ")
    assert test_cmd.endswith(".venv/bin/python -m pytest -q")
    assert vladapt_invocations(main_cmd), "the main command must run vladapt"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci  # CI runs the README's test command, not a copy of it


def test_readme_main_job_is_the_demo():
    assert vladapt_invocations(readme_block("main-command")) == [["demo"]]
    args = build_parser().parse_args(["demo"])
    assert args.func.__name__ == "cmd_demo" and args.model == "vladapt-tiny" and args.shots == 16


def test_zero_shot_on_a_generated_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "folder", "imgs", "--per-class", "3"]) == 0
    assert main(["zeroshot", "--model", "vladapt-test-tiny", "--folder", "imgs", "--out", "runs/zs.json"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "zs.json").read_text())
    assert record["method"] == "zeroshot" and record["backbone"]["name"] == "vladapt-test-tiny"
    assert record["total"] == record["data"]["num_images"] == 12
    assert record["correct"] == round(record["accuracy"] * record["total"] / 100)
    assert f"accuracy {record['accuracy']:.2f}%" in out
    assert not list((tmp_path / "runs").glob(".*.tmp"))  # no half-written files left behind


def test_info_lists_what_exists(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "vladapt-test-tiny" in info["backbones"]["tiny"]
    assert "ViT-B-16-quickgelu" in info["backbones"]["open_clip"]
    assert "RN50" not in info["backbones"]["open_clip"]  # ResNet towers are not implemented
    assert info["methods"]["zeroshot"] == {"trainable": False}
    assert {"eurosat", "imagenet", "imagenet_r", "folder"} <= set(info["datasets"])
    assert main(["info"]) == 0
    assert "zeroshot (training-free)" in capsys.readouterr().out


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "zeroshot" in capsys.readouterr().out
    assert main([]) == 0


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    rc = main(["zeroshot", "--folder", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "Traceback" not in err
    rc = main(["zeroshot", "--dataset", "eurosat"])
    assert rc == 2 and "--root" in capsys.readouterr().err
    from PIL import Image

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "0.png")
    rc = main(["zeroshot", "--folder", str(tmp_path / "imgs"), "--pretrained", str(tmp_path / "w.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "w.pt" in err and "does not exist" in err


def test_overrides_may_follow_list_options_and_shots_must_be_positive(tmp_path, capsys):
    from vladapt.cli import _overrides_last

    parser = build_parser()
    argv = ["train", "--method", "heba", "--protocol", "base2new", "--dataset", "dtd", "--root", str(tmp_path),
            "--shots", "1", "2", "train.epochs=1", "--seeds", "1", "2", "method.scale=1e-3", "--out", "a.b=c"]
    args = parser.parse_args(_overrides_last(parser, argv))
    assert args.shots == [1, 2] and args.seeds == [1, 2] and args.out == Path("a.b=c")
    assert args.overrides == ["train.epochs=1", "method.scale=1e-3"]
    args = parser.parse_args(_overrides_last(parser, ["demo", "--seeds", "1", "2", "train.epochs=1", "--quiet"]))
    assert args.seeds == [1, 2] and args.overrides == ["train.epochs=1"] and args.quiet
    # through main: an override after --shots reaches the config check (which names it), before any work
    rc = main(argv[:-2] + ["method.no_such_key=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_key" in err and "invalid int value" not in err
    for shots in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--method", "heba", "--protocol", "fewshot", "--dataset", "dtd", "--root", str(tmp_path),
                  "--shots", shots])
        assert e.value.code == 2 and f"must be at least 1 image per class, got {shots}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--shots", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_readme_python_api_snippet_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Python API\s*```python\n(.+?)\n```", text, re.S)
    assert m, "README.md lacks the Python API block"
    scope: dict = {}
    exec(compile(m.group(1), "README.md (Python API)", "exec"), scope)
    assert scope["logits"].shape == (2, 2) and scope["features"].shape[0] == 2
    assert scope["bb"].model.attached_modules() == {}
    assert len(scope["result"].predictions[0]["top"]) == 2
