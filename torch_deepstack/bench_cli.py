"""`deepstack bench <area>`: run benchmarks/bench_<area>.py from the source checkout."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def benchmarks_dir() -> Path | None:
    d = Path(__file__).resolve().parents[1] / "benchmarks"
    return d if d.is_dir() else None


def areas() -> list[str]:
    d = benchmarks_dir()
    return sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py")) if d else []


def add_parser(sub):
    p = sub.add_parser("bench", help="run an area's benchmark (ours vs the strongest baseline), see docs/benchmarks.md")
    p.add_argument("area", nargs="?", help="area to benchmark; omit to list them")
    p.add_argument("rest", nargs="*", help="arguments passed to the benchmark script (after --)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    d = benchmarks_dir()
    if d is None:
        print("deepstack bench needs the source checkout (benchmarks/ is not installed with the wheel)",
              file=sys.stderr)
        return 1
    if not args.area:
        print("areas: " + ", ".join(areas()))
        return 0
    script = d / f"bench_{args.area}.py"
    if not script.is_file():
        print(f"no benchmark for area {args.area!r}; known: {', '.join(areas())}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0
