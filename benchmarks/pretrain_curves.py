"""Print (and optionally plot) the curves of a `vladapt synth pretrain` log.

    python benchmarks/pretrain_curves.py pretrain.jsonl [--plot curves.png] [--halves]

The log has one JSON line per evaluation (step, loss, lr, logit_scale, zero-shot accuracy per probe
set) and a last line with the final evaluation of the saved weights. The table shows zero-shot
accuracy (%) over all classes of each probe; ``--halves`` adds base/new. The two curves to watch:
clean in-distribution accuracy should climb, accuracy on the strongly shifted downstream probes
should not peak early and then fall.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> tuple[list[dict], dict | None]:
    records, final = [], None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry.get("final"):
            final = entry
        else:
            records.append(entry)
    return records, final


def _short(name: str) -> str:
    return name.removeprefix("synth_")


def _cell(acc: dict, halves: bool) -> str:
    return f"{acc['all']:.1f}" + (f" ({acc['base']:.0f}/{acc['new']:.0f})" if halves else "")


def format_table(records: list[dict], final: dict | None, halves: bool) -> str:
    probes = list(records[0].get("zeroshot", {})) if records else []
    head = ["step", "loss", "lr", "scale"] + [_short(p) for p in probes]
    rows = []
    for e in records:
        z = e.get("zeroshot", {})
        cells = [str(e["step"]), "-" if e.get("loss") is None else f"{e['loss']:.3f}",
                 "-" if e.get("lr") is None else f"{e['lr']:.2e}", f"{e.get('logit_scale', float('nan')):.1f}"]
        for p in probes:
            v = z.get(p)
            cells.append("-" if v is None else _cell(v, halves))
        rows.append(cells)
    if final:
        z = final.get("zeroshot", {})
        rows.append(["final (fp16)", "", "", ""] + [_cell(z[p], halves) if p in z else "-" for p in probes])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if halves:
        lines.append("accuracy % over all classes (base / new halves, each among its own classes)")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in records]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for p in records[0].get("zeroshot", {}):
        ax_acc.plot(steps, [e["zeroshot"][p]["all"] for e in records], marker="o", ms=3, label=_short(p))
    ax_acc.set(xlabel="step", ylabel="zero-shot accuracy (%)", title="probe zero-shot accuracy")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    trained = [e for e in records if e.get("loss") is not None]
    ax_loss.plot([e["step"] for e in trained], [e["loss"] for e in trained], marker="o", ms=3)
    ax_loss.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="JSON-lines log written by `vladapt synth pretrain --log`")
    ap.add_argument("--plot", type=Path, help="also save a PNG of the curves")
    ap.add_argument("--halves", action="store_true", help="show base/new accuracy next to the overall one")
    args = ap.parse_args()
    records, final = read_log(args.log)
    if not records:
        raise SystemExit(f"{args.log}: no evaluation records")
    print(format_table(records, final, args.halves))
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
