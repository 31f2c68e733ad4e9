"""Transfer throughput against cp and rsync -a on the same files, and detection latency.

Prints figures; it is not a test. Run: .venv/bin/python benchmarks/bench_transfer.py [--files 8
--mib 256 --dir /path/on/target/fs]. Caches are dropped between methods when running as root, so
each method reads the source from disk (otherwise the numbers measure the page cache).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from cryoflow.ledger import Ledger  # noqa: E402
from cryoflow.transfer import copy_verified  # noqa: E402
from cryoflow.triggers.share_watch import ShareWatchTrigger  # noqa: E402


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_sources(src: Path, files: int, mib: int) -> int:
    src.mkdir(parents=True)
    block = os.urandom(1 << 20)
    for i in range(files):
        with open(src / f"FoilHole_{i}_Data_1_2_20261124_1200{i:02d}_fractions.tiff", "wb") as fh:
            for j in range(mib):
                fh.write(block[j % 7 :] + block[: j % 7])
    return files * mib << 20


def timed(label: str, fn, total: int, cold: bool) -> float:
    dropped = drop_caches() if cold else False
    t = time.perf_counter()
    fn()
    os.sync()
    dt = time.perf_counter() - t
    cache = "cold" if dropped else "warm"
    print(f"  {label:<34} {dt:7.2f} s  {total / dt / 1e6:8.1f} MB/s  ({cache} source)")
    return dt


def throughput(root: Path, files: int, mib: int) -> None:
    src = root / "src"
    total = make_sources(src, files, mib)
    print(f"\nThroughput: {files} files x {mib} MiB = {total / 1e9:.2f} GB, {root}")
    cold = os.geteuid() == 0

    def ours() -> None:
        for f in sorted(src.iterdir()):
            copy_verified(f, root / "ours" / f.name)

    def cp() -> None:
        subprocess.run(["cp", "-a", str(src), str(root / "cp")], check=True)

    def rsync() -> None:
        subprocess.run(["rsync", "-a", f"{src}/", f"{root / 'rsync'}/"], check=True)

    def cp_then_hash() -> None:
        subprocess.run(["cp", "-a", str(src), str(root / "cp2")], check=True)
        subprocess.run(
            ["xxhsum", "-H2", *map(str, (root / "cp2").iterdir())], check=True, capture_output=True
        )

    timed("cryoflow copy_verified (xxh3+fsync+verify)", ours, total, cold)
    timed("cp -a", cp, total, cold)
    if shutil.which("rsync"):
        timed("rsync -a", rsync, total, cold)
    else:
        print("  rsync -a                            (rsync not installed: apt-get install rsync)")
    if shutil.which("xxhsum"):
        timed("cp -a, then xxhsum of the copies", cp_then_hash, total, cold)


def latency(root: Path, movies: int, settle: float, poll: float) -> None:
    share, dest = root / "share", root / "dest"
    share.mkdir()
    ledger_url = f"sqlite:///{root}/ledger.db"
    ledger = Ledger(ledger_url)
    sid = ledger.open_session(
        "bench", "lat", dest_root=str(dest), source_root=str(share), params={}
    )
    finished: dict[str, float] = {}

    def writer() -> None:  # a detector writing 40 frames of 4 MiB over ~2 s, one movie every 3 s
        frame = os.urandom(4 << 20)
        for i in range(movies):
            name = f"movie_{i:03d}.tiff"
            with open(share / name, "wb") as fh:
                for _ in range(40):
                    fh.write(frame)
                    fh.flush()
                    time.sleep(0.05)
            finished[name] = time.time()
            time.sleep(1.0)

    thread = threading.Thread(target=writer)
    thread.start()
    copied: dict[str, float] = {}
    while len(copied) < movies:
        trigger = ShareWatchTrigger(
            root=str(share),
            ledger_url=ledger_url,
            session_id=sid,
            settle_seconds=settle,
            poll_seconds=poll,
            batch_window_seconds=0,
            idle_timeout_seconds=60,
        )

        async def first(trig: ShareWatchTrigger = trigger):
            async for event in trig.run():
                return event.payload

        event = asyncio.run(first())
        for item in event["files"]:
            rel = item["relpath"]
            fid, _ = ledger.begin_copy(
                sid, rel, kind="movie", size=item["size"], mtime_ns=item["mtime_ns"], batch="b"
            )
            r = copy_verified(share / rel, dest / rel, expected=(item["size"], item["mtime_ns"]))
            ledger.mark_verified(
                fid, checksum=r.checksum, dest_path=str(dest / rel), copy_seconds=0.0
            )
            copied[rel] = time.time()
    thread.join()
    lat = sorted(copied[n] - finished[n] for n in copied)
    print(f"\nDetection latency (last byte written -> verified copy), {movies} movies of 160 MiB,")
    print(
        f"settle {settle} s, poll {poll} s: mean {statistics.mean(lat):.2f} s, "
        f"min {lat[0]:.2f} s, max {lat[-1]:.2f} s "
        f"(floor = settle + up to one poll + copy time)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--movies", type=int, default=5)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--dir", type=Path, default=None, help="where to write (the target filesystem)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cryoflow-bench-") as tmp:
        throughput(Path(tmp), args.files, args.mib)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cryoflow-bench-") as tmp:
        latency(Path(tmp), args.movies, args.settle, args.poll)


if __name__ == "__main__":
    main()
