"""Draw Fréchet distance against block-FLOP fraction, one line per method, from training_free.py's JSON.

    python benchmarks/plot_frechet.py training_free.json docs/frechet_vs_flops.png
    python benchmarks/plot_frechet.py a.json b.json docs/frechet_vs_flops.png   # rows of several runs, one plot

Several files merge only where their settings (samples, seeds, solver, steps, CFG, calibration set) agree and
a row present in more than one holds the same numbers (the benchmark is deterministic on the CPU, up to the
last digits of the matrix square root: Fréchet distances are compared to 1e-5).

Rows are named ``method@budget`` (plus ``full``; knee.py's ``steps-K`` rows, full depth at fewer steps, make the
black "fewer steps" line, drawn thicker); each point is a row's measured block-FLOP fraction and its
Fréchet distance, with its bootstrap interval as a bar. Every method line ends at the full-depth point. The
y axis is logarithmic: naive truncation lands orders of magnitude above the rest. Pillow only.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (90, 90, 200), (0, 100, 0)]
FEWER = "fewer steps (full depth)"  # knee.py's rows steps-K: full depth at K steps, fraction K / the run's steps


def series(doc: dict) -> tuple[dict, dict | None]:
    """``({method: [(fraction, frechet, lo, hi)] sorted by fraction}, full row)`` from the JSON rows."""
    full, out = None, {}
    for r in doc["rows"]:
        if "error" in r or r.get("frechet") is None or r["variant"] == "real":
            continue
        lo, hi = r.get("frechet_ci", (r["frechet"], r["frechet"]))
        point = (r["block_flop_fraction"], r["frechet"], lo, hi)
        if r["variant"] == "full":
            full = point
            continue
        name = FEWER if r["variant"].startswith("steps-") else r["variant"].split("@")[0]
        out.setdefault(name, []).append(point)
    for pts in out.values():
        pts.sort()
        if full is not None:
            pts.append(full)
    return out, full


SAME = ("num_samples", "seeds", "sampler", "steps", "cfg_scale", "frechet_mode", "calibration_samples",
        "calibration_seed", "base")


def _same(a: dict, b: dict) -> bool:
    """The same row: equal accuracy, and Fréchet distances equal to 1e-5 (the matrix square root's last digits
    vary from run to run)."""
    fa, fb = a.get("frechet"), b.get("frechet")
    close = fa == fb or (fa is not None and fb is not None and math.isclose(fa, fb, rel_tol=1e-5))
    return close and a.get("accuracy") == b.get("accuracy")


def merge(docs: list[dict]) -> dict:
    """One document from several training_free.py outputs of the same settings (``SAME``): rows by variant."""
    first = docs[0]
    rows = {r["variant"]: r for r in first["rows"]}
    for i, doc in enumerate(docs[1:], 1):
        for k in SAME:
            if first.get("settings", {}).get(k) != doc.get("settings", {}).get(k):
                raise ValueError(f"plot_frechet: file {i + 1} has settings {k}={doc.get('settings', {}).get(k)!r}, "
                                 f"file 1 {first.get('settings', {}).get(k)!r}: not the same benchmark")
        for r in doc["rows"]:
            old = rows.get(r["variant"])
            if old is not None and not _same(old, r):
                raise ValueError(f"plot_frechet: row {r['variant']!r} differs between the files "
                                 f"({old.get('frechet')} vs {r.get('frechet')})")
            rows.setdefault(r["variant"], r)
    return {**first, "rows": list(rows.values())}


def draw(doc: dict, path, size=(960, 600)) -> Path:
    lines, full = series(doc)
    if not lines:
        raise ValueError("plot_frechet: the results hold no method rows (named 'method@budget')")
    W, H = size
    left, right, top, bottom = 80, 250, 50, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ys = [v for pts in lines.values() for p in pts for v in (p[1], max(p[2], 1e-3), p[3])]
    y0, y1 = math.floor(math.log10(max(min(ys), 1e-3))), math.ceil(math.log10(max(ys)))
    y1 = max(y1, y0 + 1)
    x0, x1 = 0.1 * math.floor(10 * min(p[0] for pts in lines.values() for p in pts)) - 0.05, 1.02

    def px(f, fd):
        X = left + (f - x0) / (x1 - x0) * (W - left - right)
        Y = top + (y1 - math.log10(max(fd, 10.0 ** y0))) / (y1 - y0) * (H - top - bottom)
        return X, Y

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for e in range(y0, y1 + 1):
        _, Y = px(x0, 10.0 ** e)
        d.line([left, Y, W - right, Y], fill=(225, 225, 225))
        d.text((left - 8, Y), f"{10.0 ** e:g}", fill="black", font=font, anchor="rm")
    f = math.ceil(x0 * 10) / 10
    while f <= 1.0 + 1e-9:
        X, _ = px(f, 10.0 ** y0)
        d.line([X, top, X, H - bottom], fill=(235, 235, 235))
        d.text((X, H - bottom + 8), f"{f:.1f}", fill="black", font=font, anchor="mt")
        f += 0.1
    d.text(((left + W - right) / 2, H - 22), "block-FLOP fraction (counted for diffusers' caches; fewer steps: steps / the run's steps)", fill="black",
           font=font, anchor="mm")
    d.text((12, top - 20), "Frechet distance, judge features (log; bars: 95% bootstrap interval)", fill="black",
           font=font)
    s = doc.get("settings", {})
    d.text((left, 6), f"early exit and fewer steps on the glyph DiT: {s.get('num_samples')} samples x "
           f"{len(s.get('seeds', [0]))} seeds, {s.get('sampler')} {s.get('steps')} steps, CFG {s.get('cfg_scale')}",
           fill="black", font=font)
    for i, (name, pts) in enumerate(sorted(lines.items())):
        c = (0, 0, 0) if name == FEWER else COLORS[i % len(COLORS)]
        xy = [px(p[0], p[1]) for p in pts]
        d.line(xy, fill=c, width=4 if name == FEWER else 2)
        for p, (X, Y) in zip(pts, xy):
            _, Ylo = px(p[0], max(p[2], 10.0 ** y0))
            _, Yhi = px(p[0], p[3])
            d.line([X, Ylo, X, Yhi], fill=c, width=1)
            d.ellipse([X - 4, Y - 4, X + 4, Y + 4], fill=c)
        ly = top + 20 * i + 10
        d.line([W - right + 15, ly, W - right + 40, ly], fill=c, width=3)
        d.text((W - right + 46, ly), name, fill="black", font=font, anchor="lm")
    if full is not None:
        _, Y = px(x0, full[1])
        d.text((W - right + 15, top + 20 * len(lines) + 10), f"full depth: {full[1]:.1f}", fill="black", font=font,
               anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="training_free.py --json output(s) of the same settings")
    p.add_argument("png", help="the PNG to write")
    a = p.parse_args(argv)
    print(draw(merge([json.loads(Path(f).read_text()) for f in a.json]), a.png))


if __name__ == "__main__":
    main()
