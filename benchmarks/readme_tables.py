"""Print the README's result tables as Markdown, from the JSON the commands wrote under docs/.

    python benchmarks/readme_tables.py            # every table
    python benchmarks/readme_tables.py accuracy   # one of: speed, onnx, model, accuracy, controls, goals, layers

The tables are copied into README.md by hand; this keeps every figure there traceable to a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PRESETS = ("streampetr-v2-99-1600x640", "petr-r50-1408x512", "3dppe-800x320", "focalpetr-r50-704x256")


def load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def speed() -> str:
    rows = [
        "| preset (keys, setting) | dense | tgGBC reference | tgGBC fast | fast vs dense | fast vs reference "
        "| FLOP ratio | tgGBC's own work | peak MB dense / ref / fast |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        path = DOCS / "bench" / f"{name}.cpu.json"
        if not path.is_file():
            continue
        d = load(path)
        s, r = d["setting"], {x["method"]: x for x in d["results"]}
        dense, ref, fast = r["dense"], r["reference"], r["fast"]
        rows.append(
            f"| {name} ({s['keys']}, r={s['r']} n={s['n']} k={s['k']}) | {dense['median_ms']:.0f} ms "
            f"| {ref['median_ms']:.0f} ms | **{fast['median_ms']:.0f} ms** | **{fast['speedup']:.2f}x** "
            f"| {ref['median_ms'] / fast['median_ms']:.2f}x | {fast['flop_ratio']:.2f}x "
            f"| {fast['prune_ms']:.1f} ms ({fast['prune_share']:.1%}) "
            f"| {dense['peak_mb']:.0f} / {ref['peak_mb']:.0f} / **{fast['peak_mb']:.0f}** |"
        )
    return "\n".join(rows)


def onnx() -> str:
    rows = ["| runtime | dense graph | tgGBC graph | speedup |", "|---|---|---|---|"]
    for path in sorted((DOCS / "bench").glob("streampetr-v2-99-1600x640.*.json")):
        d = load(path)
        if d["env"].get("backend", "torch") == "torch":
            continue
        r = {x["method"]: x for x in d["results"]}
        label = f"{d['env']['backend']} {d['env']['dtype']}"
        rows.append(
            f"| {label} | {r['dense']['median_ms']:.0f} ms | **{r['tggbc']['median_ms']:.0f} ms** "
            f"| **{r['tggbc']['speedup']:.2f}x** |"
        )
    return "\n".join(rows)


def model() -> str:
    rows = [
        "| model (input, keys) | dense | tgGBC | speedup | decoder share dense -> tgGBC | decoder speedup |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted((DOCS / "bench").glob("model-*.json")):
        d = load(path)
        info, r = d["model"], {x["method"]: x for x in d["results"]}
        dense, tg = r["dense"], r["tggbc"]
        rows.append(
            f"| {info['model']} ({info['image_size'][1]}x{info['image_size'][0]}, {info['keys']}) "
            f"| {dense['median_ms']:.0f} ms | {tg['median_ms']:.0f} ms | **{tg['speedup']:.2f}x** "
            f"| {dense['decoder_share']:.0%} -> {tg['decoder_share']:.0%} | {tg['decoder_speedup']:.2f}x |"
        )
    return "\n".join(rows)


def _interval(d: dict | None, scale: float = 100.0) -> str:
    if d is None:
        return ""
    return f"{scale * d['value']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"


def accuracy(path: Path = DOCS / "eval" / "results.json") -> str:
    d = load(path)
    results = d["results"]
    dense = next(r for r in results if r["method"] is None)
    fractions = sorted({r["fraction"] for r in results if r["method"]})
    methods = [
        m for m in ("tggbc", "attention", "merge", "random", "inverse") if any(r["method"] == m for r in results)
    ]
    rows = [
        f"Dense decoder: mAP {dense['mAP']:.4f}, NDS {dense['NDS']:.4f}, {dense['decoder_ms']:.1f} ms. "
        "Each cell: mAP change against dense, in points [95% interval].",
        "",
        "| keys dropped after layer 1 | " + " | ".join(methods) + " | tgGBC NDS change (x100) | decoder ms (tgGBC) |",
        "|---|" + "---|" * (len(methods) + 2),
    ]
    for f in fractions:
        cells = {r["method"]: r for r in results if r["fraction"] == f and r["method"]}
        row = f"| {100 * f:g}% | " + " | ".join(_interval(cells[m]["mAP_diff"]) for m in methods)
        rows.append(row + f" | {_interval(cells['tggbc']['NDS_diff'])} | {cells['tggbc']['decoder_ms']:.1f} |")
    return "\n".join(rows)


def controls(path: Path = DOCS / "eval" / "results.json") -> str:
    """Each control's mAP minus tgGBC's at the same budget, in points, with the paired interval."""
    results = load(path)["results"]
    fractions = sorted({r["fraction"] for r in results if r["method"]})
    methods = [m for m in ("attention", "merge", "random", "inverse") if any(r["method"] == m for r in results)]
    rows = ["| keys dropped | " + " | ".join(f"{m} - tgGBC" for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for f in fractions:
        cells = {r["method"]: r for r in results if r["fraction"] == f and r["method"]}
        rows.append(f"| {100 * f:g}% | " + " | ".join(_interval(cells[m].get("mAP_vs_tggbc")) for m in methods) + " |")
    return "\n".join(rows)


def goals(path: Path = DOCS / "eval" / "results.json") -> str:
    """The accuracy issue's goals, each with the measured figure and whether it is met."""
    results = load(path)["results"]
    dense = next(r for r in results if r["method"] is None)
    at = {r["method"]: r for r in results if r["fraction"] == 0.875 and r["method"]}
    tg, rnd, inv = at["tggbc"], at["random"], at["inverse"]
    tg_loss, rnd_loss, inv_loss = (
        -100 * tg["mAP_diff"]["value"],
        -100 * rnd["mAP_diff"]["value"],
        -100 * inv["mAP_diff"]["value"],
    )
    checks = [
        ("dense mAP >= 0.30", f"{dense['mAP']:.4f}", dense["mAP"] >= 0.30),
        ("tgGBC 87.5%: mAP lost <= 1.0 point", f"{tg_loss:.2f}", tg_loss <= 1.0),
        ("tgGBC 87.5%: NDS lost <= 0.01", f"{-tg['NDS_diff']['value']:.4f}", -tg["NDS_diff"]["value"] <= 0.01),
        ("random loses >= 3x tgGBC's mAP", f"{rnd_loss:.2f} vs 3 x {tg_loss:.2f}", rnd_loss >= 3 * tg_loss),
        ("random loses >= 1 point", f"{rnd_loss:.2f}", rnd_loss >= 1.0),
        ("inverse loses more than random", f"{inv_loss:.2f} vs {rnd_loss:.2f}", inv_loss > rnd_loss),
    ]
    rows = ["| goal (87.5% of keys dropped after layer 1) | measured | met |", "|---|---|---|"]
    rows += [f"| {goal} | {value} | {'yes' if ok else '**no**'} |" for goal, value, ok in checks]
    return "\n".join(rows)


def layers(path: Path = DOCS / "eval" / "results.json") -> str:
    d = load(path)
    rows = ["| dense decoder, boxes after layer | mAP | NDS | mAP vs layer 6 [95% interval] |", "|---|---|---|---|"]
    for r in d.get("layers", []):
        rows.append(f"| {r['name'].split('-')[1]} | {r['mAP']:.4f} | {r['NDS']:.4f} | {_interval(r['mAP_diff'])} |")
    return "\n".join(rows)


TABLES = {
    "speed": speed,
    "onnx": onnx,
    "model": model,
    "accuracy": accuracy,
    "controls": controls,
    "goals": goals,
    "layers": layers,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        sys.exit(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    for name in names:
        print(f"<!-- {name} -->\n{TABLES[name]()}\n")
