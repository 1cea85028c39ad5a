"""Rewrite the generated sections of benchmarks/RESULTS.md from the benchmark JSON files.

    python -m benchmarks.peers --out benchmarks/results/peers && python -m benchmarks.report

Each section lives between two markers; everything outside them is left as it is. A missing
section is appended at the end of the file; a missing JSON file leaves a "not measured" line
with the command that measures it.

  peers  benchmarks/results/peers/*.json        (python -m benchmarks.peers; one table set per run)
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


def _json_files(spec: dict, root: Path, given: list[Path] | None) -> list[Path]:
    if given:
        return [p for p in given if p.is_file()]
    return sorted(root.glob(spec["json"]))


def _gpu(data: dict) -> str:
    from benchmarks.gpu_check import render_markdown

    return render_markdown(data)


SECTIONS = {
    "peers": {
        "title": "Peers: LitServe and plain FastAPI serving the same VAE",
        "json": "benchmarks/results/peers/*.json",
        "render": _peers,
        "how": "python -m benchmarks.peers --out benchmarks/results/peers && python -m benchmarks.report",
        "where": "on the benchmark machine (bounded by --budget-s; see `python -m benchmarks.peers --help`)",
    },
    "gpu": {
        "title": "GPU check (issue 14)",
        "json": "benchmarks/results/gpu/gpu_check.json",
        "render": _gpu,
        "how": "bash benchmarks/gpu_check.sh",
        "where": "on a lent GPU machine (the script's header says how to prepare and carry its wheels); copy "
                 "its $OUT/gpu_check.json to benchmarks/results/gpu/, then run `python -m benchmarks.report`",
    },
}


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: python -m benchmarks.report rewrites this section; edit outside it -->"


def end(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def section_text(name: str, root: Path = ROOT, json_paths: list[Path] | None = None) -> str:
    spec = SECTIONS[name]
    paths = _json_files(spec, root, json_paths)
    if not paths:
        return f"Not measured yet. Run `{spec['how']}` {spec['where']}.\n"
    parts = [f"Generated from {', '.join(f'`{_rel(p, root)}`' for p in paths)}. Re-run: `{spec['how']}`."]
    for path in paths:
        parts.append(spec["render"](json.loads(path.read_text())).rstrip())
    return "\n\n".join(parts) + "\n"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


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
    p.add_argument("--peers-json", type=Path, nargs="+", default=None, help=f"default {SECTIONS['peers']['json']}")
    p.add_argument("--gpu-json", type=Path, nargs="+", default=None, help=f"default {SECTIONS['gpu']['json']}")
    args = p.parse_args(argv)
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    overrides = {"peers": args.peers_json, "gpu": args.gpu_json}
    for name in args.sections:
        text = rewrite(text, name, section_text(name, json_paths=overrides[name]))
    args.results.write_text(text)
    print(f"rewrote {', '.join(args.sections)} in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
