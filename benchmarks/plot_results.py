"""Draw the README figure from benchmarks/RESULTS.md: sampling images/s, full depth vs early exit vs baselines.

    python benchmarks/plot_results.py            # writes docs/throughput.png

It reads the table of section 3 of RESULTS.md (the H100 sampling run), so the figure never shows a number
that RESULTS.md does not hold. Pillow only (a package dependency already), no plotting library.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]


def read_sampling_rows(results: Path) -> tuple[str, list[tuple[str, float]]]:
    """(section title, [(system, images/s)]) from the table of section 3; "a / b" rows become two bars."""
    text = results.read_text()
    m = re.search(r"^## 3\. (.+?)$(.+?)^## ", text, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"{results}: no section '## 3.' with the sampling table")
    title, body = m.group(1).strip(), m.group(2)
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("system", "") or set(cells[0]) <= {"-", " "}:
            continue
        label, value = cells
        label = re.sub(r"\s*\(.*\)", "", label.replace("`", "")) if len(label) > 55 else label
        numbers = re.findall(r"\d+(?:\.\d+)?", value.replace("*", ""))
        if "target" in label:
            continue
        if ", full / ASE" in label and len(numbers) >= 2:
            stem = label.replace(", full / ASE", "")
            rows += [(f"{stem}, full", float(numbers[0])), (f"{stem}, ASE", float(numbers[1]))]
        elif numbers:
            rows.append((label, float(numbers[0])))
    if not rows:
        raise SystemExit(f"{results}: the section-3 table has no rows")
    return title, rows


def draw(title: str, rows: list[tuple[str, float]], out: Path) -> None:
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=13)
    label_w, bar_w, row_h, top = 430, 420, 30, 56
    img = Image.new("RGB", (label_w + bar_w + 80, top + row_h * len(rows) + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((12, 10), "images/s, higher is better", font=font, fill="black")
    d.text((12, 30), title[:120], font=small, fill="#555")
    vmax = max(v for _, v in rows)
    for i, (label, v) in enumerate(rows):
        y = top + i * row_h
        colour = "#d62728" if "eekernels" in label and "ASE" in label else (
            "#ff9896" if "eekernels" in label else ("#7f7f7f" if "floor" in label else "#1f77b4"))
        d.text((12, y + 6), label[:60], font=small, fill="black")
        w = int(bar_w * v / vmax)
        d.rectangle([label_w, y + 4, label_w + w, y + row_h - 6], fill=colour)
        d.text((label_w + w + 6, y + 6), f"{v:g}", font=small, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--out", default=str(ROOT / "docs" / "throughput.png"))
    args = p.parse_args(argv)
    title, rows = read_sampling_rows(Path(args.results))
    draw(title, rows, Path(args.out))
    print(f"wrote {args.out}: {len(rows)} bars")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
