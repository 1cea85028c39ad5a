"""Numbers, tables and result files: quantiles, a Markdown table, NAME.json + NAME.md."""

from __future__ import annotations

import json
from pathlib import Path


def quantiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    import numpy as np

    if not len(values):
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, result: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(result, indent=1, default=str) + "\n")
    m.write_text(markdown.rstrip() + "\n")
    return j, m
