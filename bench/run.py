"""Run every benchmark: each ``bench/bench_*.py`` module's ``main(argv)``, in name order.

``main`` returns an exit code (non-zero = failed) or None / its results; an exception fails it.

python -m bench.run                      # every benchmark at its default size, but bench_scale (make bench-scale)
python -m bench.run ome_zarr -- --gib 0.1   # only the named ones, with arguments passed through
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

ON_ITS_OWN = {
    "scale",
    "suite",
}  # tens of minutes each (make bench-scale; a fresh clone's make test): named here


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in Path(__file__).resolve().parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    available = discover()
    names = argv or [n for n in available if n not in ON_ITS_OWN]
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"=== bench_{name} ===", flush=True)
        t = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            result = module.main(passthrough)
            # a benchmark's main returns an exit code, or None / its results when it ran
            ok = not (isinstance(result, int) and not isinstance(result, bool) and result != 0)
        except Exception as exc:  # one failing benchmark must not hide the others
            print(f"bench_{name} failed: {exc!r}", file=sys.stderr)
            ok = False
        except SystemExit as exc:  # argparse errors and sys.exit() inside a benchmark
            ok = exc.code in (None, 0)
        print(
            f"=== bench_{name}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t:.0f} s ===\n",
            flush=True,
        )
        if not ok:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
