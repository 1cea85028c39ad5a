"""Rewrite the generated sections of benchmarks/RESULTS.md from the benchmark JSON files.

    python -m benchmarks.peers --out benchmarks/results/peers && python -m benchmarks.report

Each section lives between two markers; everything outside them is left as it is. A missing
section is appended at the end of the file; a missing JSON file leaves a "not measured" line
with the command that measures it.

  peers  benchmarks/results/peers/peers.json    (python -m benchmarks.peers)
  gpu    benchmarks/results/gpu/gpu_check.json  (bash benchmarks/gpu_check.sh on a GPU machine;
                                                 copy its $OUT/gpu_check.json there)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _peers(data: dict) -> str:
    from benchmarks.peers import render_markdown

    return render_markdown(data)


def _gpu(data: dict) -> str:
    from benchmarks.gpu_check import render_markdown

    return render_markdown(data)


SECTIONS = {
    "peers": {
        "title": "Peers: LitServe and plain FastAPI serving the same VAE",
        "json": "benchmarks/results/peers/peers.json",
        "render": _peers,
        "how": "python -m benchmarks.peers --out benchmarks/results/peers && python -m benchmarks.report",
    },
    "gpu": {
        "title": "GPU check (issue 14)",
        "json": "benchmarks/results/gpu/gpu_check.json",
        "render": _gpu,
        "how": "bash benchmarks/gpu_check.sh on a GPU machine (its header says how), then copy $OUT/gpu_check.json "
               "to benchmarks/results/gpu/ and run python -m benchmarks.report",
    },
}


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: python -m benchmarks.report rewrites this section; edit outside it -->"


def end(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def section_text(name: str, root: Path = ROOT, json_path: Path | None = None) -> str:
    spec = SECTIONS[name]
    path = json_path or (root / spec["json"])
    if not path.is_file():
        return f"Not measured yet: `{spec['how']}`.\n"
    data = json.loads(path.read_text())
    return f"Source: `{spec['json']}`. Re-run: `{spec['how']}`.\n\n" + spec["render"](data).rstrip() + "\n"


def rewrite(text: str, name: str, body: str) -> str:
    """`text` with the section `name` replaced by `body` (appended, with a heading, when absent)."""
    block = f"{begin(name)}\n{body.rstrip()}\n{end(name)}"
    pattern = re.compile(re.escape(begin(name)) + r".*?" + re.escape(end(name)), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text, count=1)
    return text.rstrip("\n") + f"\n\n## {SECTIONS[name]['title']}\n\n{block}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to rewrite")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--peers-json", type=Path, default=None, help=f"default {SECTIONS['peers']['json']}")
    p.add_argument("--gpu-json", type=Path, default=None, help=f"default {SECTIONS['gpu']['json']}")
    args = p.parse_args(argv)
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    overrides = {"peers": args.peers_json, "gpu": args.gpu_json}
    for name in args.sections:
        text = rewrite(text, name, section_text(name, json_path=overrides[name]))
    args.results.write_text(text)
    print(f"rewrote {', '.join(args.sections)} in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
