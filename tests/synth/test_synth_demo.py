"""An end-to-end reduced `vladapt demo` on the bundled tiny CLIP: real training beats zero-shot on base."""

from __future__ import annotations

import json

from vladapt.cli import main


def test_reduced_demo_heba_beats_zero_shot_on_base(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--datasets", "synth_shapes", "--per-class", "16", "4", "10", "--shots", "8",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    recs = {p.parent.parent.name: json.loads(p.read_text())
            for p in (out / "records" / "base2new").rglob("shots_8-seed_1.json")}
    assert set(recs) == {"zeroshot", "heba"}
    zs, heba = recs["zeroshot"]["results"], recs["heba"]["results"]
    assert recs["heba"]["trained"] and not recs["zeroshot"]["trained"]
    assert recs["heba"]["backbone"]["name"] == "vladapt-tiny" and recs["heba"]["backbone"]["pretrained"] == "bundled"
    assert heba["base"]["accuracy"] >= zs["base"]["accuracy"] + 5
    # the demo trains with its packaged configuration (configs/heba/demo.yaml), not the base2new one
    assert recs["heba"]["method_config"]["scale"] == 0.1
    assert heba["base"]["total"] == zs["base"]["total"] == 8 * 10  # 8 base classes x 10 test images
    assert (out / "report.md").read_text().startswith("# vladapt demo")
    assert (out / "base2new.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| heba |" in printed and "| zeroshot |" in printed
