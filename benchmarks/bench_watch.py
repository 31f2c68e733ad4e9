"""One share poll (``scan_tree``) against ``find`` and a plain ``os.walk`` + stat loop.

A watch re-lists the whole session folder every few seconds, so the poll must stay cheap when
EPU has written 100 000 files. This builds EPU-like trees of small files in a temporary folder
(removed afterwards) and prints, per size, the median of 3 warm-cache runs of:

* ``scan_tree``: the real poll, with krios1's shipped exclude (``*.jpg``, ``*.jpeg``);
* ``find``: ``find ROOT -type f -printf '%s %T@\\n' > /dev/null``, the floor for the same stats;
* ``os.walk``: Python's os.walk plus ``os.stat`` per file, what a naive poll costs.

Run: .venv/bin/python benchmarks/bench_watch.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from cryoflow.ingest.share.scan import scan_tree  # noqa: E402

EXCLUDE = ("*.jpg", "*.jpeg")  # config/microscopes/krios1.yaml
PER_SQUARE = 300  # files per GridSquare_N/Data folder, about what EPU writes per square


def build_share(root: Path, n_files: int) -> int:
    """Write ``n_files`` tiny files as EPU lays them out; returns how many scan_tree should list."""
    written = listed = 0
    square = 0
    while written < n_files:
        square += 1
        data = root / "Images-Disc1" / f"GridSquare_{square}" / "Data"
        data.mkdir(parents=True)
        hole = 0
        while written < n_files and hole * 3 < PER_SQUARE:
            hole += 1
            stem = f"FoilHole_{square * 1000 + hole}_Data_{square}_{hole}_20261124_101010"
            for suffix in ("_fractions.tiff", ".xml", ".jpg"):
                if written == n_files:
                    break
                fd = os.open(data / f"{stem}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                os.write(fd, b"x")
                os.close(fd)
                written += 1
                listed += suffix != ".jpg"
    return listed


def walk_stat(root: Path) -> int:
    """The naive poll: os.walk and one os.stat per file, no filtering."""
    count = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            count += st.st_size > 0
    return count


def find_stat(root: Path) -> None:
    cmd = ["find", str(root), "-type", "f", "-printf", "%s %T@\\n"]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)


def medians(methods: dict[str, Callable[[], object]], repeat: int = 3) -> dict[str, float]:
    """Median wall time of each method, run round-robin so background noise hits all alike."""
    for fn in methods.values():
        fn()  # warm the dentry/inode caches so every method sees the same state
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated file counts")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"{'files':>8} {'listed':>8} {'scan_tree s':>12} {'find s':>8} {'os.walk s':>10}")
    with tempfile.TemporaryDirectory(prefix="bench_watch_") as tmp:
        for n in sizes:
            root = Path(tmp) / f"share_{n}"
            expected = build_share(root, n)
            result = scan_tree(root, EXCLUDE)
            if len(result.files) != expected or result.errors:
                raise SystemExit(f"scan_tree listed {len(result.files)}, expected {expected}")
            os.sync()  # let writeback of the new inodes finish before timing anything
            t = medians(
                {
                    "scan": lambda root=root: scan_tree(root, EXCLUDE),
                    "find": lambda root=root: find_stat(root),
                    "walk": lambda root=root: walk_stat(root),
                }
            )
            print(f"{n:>8} {expected:>8} {t['scan']:>12.3f} {t['find']:>8.3f} {t['walk']:>10.3f}")


if __name__ == "__main__":
    main()
