"""Verified-copy throughput next to cp -a, rsync -a and a read-only pass, and detection latency.

Prints figures; it is not a test. One run measures, on the SAME source files:

- a read-only pass (a Python ``readinto`` loop with the product's 8 MiB buffer, one thread:
  what just reading the sources costs),
- ``cp -a`` and ``rsync -a`` of the folder,
- ``cp -a``, then its copy read back from the storage (pages dropped after the flush): the least
  that any copy verified at its destination costs,
- the product's copy path, :func:`cryoflow.session.transfer_batch` (xxh3-128 in the copy pass,
  fsync, chmod, read-back verification after ``POSIX_FADV_DONTNEED``, no-clobber rename, ledger
  rows), with one stream and with a pool (``--streams``, plus the configured default),

for two file sets: movies (``--files`` x ``--mib``) and many small files like the XML and JPG
EPU writes beside each movie (``--small-files`` x ``--small-kib``). Every time includes a final
``sync``, so cp's and rsync's unflushed writes are paid for as the product's fsyncs are. As
root, the page cache is dropped before each method ("cold": the sources are read from the
disk); otherwise the sources come from the cache ("warm") and the figures flatter reading.

``readback`` checks whether the verification's read-back is served by the page cache or by the
storage (page residency via mincore before and after the DONTNEED, and its speed against a
warm and a cold read). ``latency`` runs the real watch trigger and ``ingest_event`` on TIFF
movies written frame by frame (imports Airflow, ~7 s).

Run: .venv/bin/python benchmarks/bench_transfer.py [--parts movies,small,readback,latency]
     [--files 8 --mib 128 --small-files 400 --small-kib 256 --streams 1,4 --dir /target/fs]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from cryoflow.config import FacilityConfig, load_site  # noqa: E402
from cryoflow.ingest import transfer as transfer_module  # noqa: E402
from cryoflow.ingest.transfer import copy_verified, file_checksum  # noqa: E402
from cryoflow.ledger.store import Ledger  # noqa: E402
from cryoflow.names import to_text  # noqa: E402
from cryoflow.session import (  # noqa: E402
    SessionHandle,
    SessionParams,
    form_defaults,
    ingest_event,
    open_session,
    transfer_batch,
)

SCOPE = "krios1"  # EPU layout
PARTS = ("movies", "small", "readback", "latency")
READ_CHUNK = 8 << 20


# --------------------------------------------------------------------------- system helpers


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.CalledProcessError):
        return "?"


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]  # fmt: skip
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mincore on a mapping that touches nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in bytes(vec)) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def read_files(paths: list[Path]) -> None:
    buf = bytearray(READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def fill(path: Path, size: int, seed: int, block: bytes) -> None:
    """``size`` bytes that differ from file to file (a rotation of one random block)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    k = seed % 4093
    piece = block[k:] + block[:k]
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, len(piece))
            fh.write(piece[:n])
            left -= n


class ThreadTime:
    """Thread-seconds the product spends in its verification read-back and in ledger calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def _wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[key] += time.perf_counter() - t

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[ThreadTime]:
        saved = (
            transfer_module.file_checksum,
            Ledger.begin_copies,
            Ledger.mark_verified_many,
            os.fsync,
        )
        transfer_module.file_checksum = self._wrap("verify", saved[0])  # what _verify calls
        Ledger.begin_copies = self._wrap("ledger", saved[1])  # type: ignore[method-assign]
        Ledger.mark_verified_many = self._wrap("ledger", saved[2])  # type: ignore[method-assign]
        os.fsync = self._wrap("fsync", saved[3])  # file and folder (SQLite's own are in C)
        try:
            yield self
        finally:
            (
                transfer_module.file_checksum,
                Ledger.begin_copies,
                Ledger.mark_verified_many,
                os.fsync,
            ) = saved


# --------------------------------------------------------------------------- the site


class Site:
    """The shipped config pointed at a throw-away share, GPFS and SQLite ledger."""

    def __init__(self, root: Path, settle: float, poll: float, ledger_url: str | None) -> None:
        share, gpfs = root / "share", root / "gpfs"
        (share / SCOPE).mkdir(parents=True)
        gpfs.mkdir()
        os.environ.update(
            {
                "CRYOFLOW_CONFIG_DIR": str(ROOT / "config"),
                "CRYOFLOW_SHARE_ROOT": str(share),
                "CRYOFLOW_GPFS_ROOT": str(gpfs),
                "CRYOFLOW_LEDGER_URL": ledger_url or f"sqlite:///{root}/ledger.db",
                "CRYOFLOW_SETTLE_SECONDS": str(settle),
                "CRYOFLOW_POLL_SECONDS": str(poll),
                "CRYOFLOW_BATCH_WINDOW_SECONDS": "0",
                "CRYOFLOW_LOCAL_WORKDIR": str(root / "jobs"),
                "CRYOFLOW_GPU_BACKEND": "local",
                "CRYOFLOW_CPU_BACKEND": "local",
                "AIRFLOW_HOME": str(root / "airflow"),  # only the latency part imports Airflow
            }
        )
        site = load_site()
        self.facility = site.facility
        self.scope = site.microscopes[SCOPE]
        self.share = Path(self.scope.share.path)
        self._sessions = 0

    def with_transfer(self, **update: Any) -> None:
        t = self.facility.transfer.model_copy(update=update)
        self.facility = self.facility.model_copy(update={"transfer": t})

    def with_streams(self, streams: int) -> FacilityConfig:
        t = self.facility.transfer
        return self.facility.model_copy(
            update={"transfer": t.model_copy(update={"streams": streams})}
        )

    def session(self, folder: str, label: str, **form: Any) -> tuple[SessionParams, SessionHandle]:
        self._sessions += 1
        values = {
            **form_defaults(self.scope),
            "session_name": f"bench-{self._sessions}-{label}",
            "source_folder": folder,
            **form,
        }
        params = SessionParams.from_form(values)
        handle, _ = open_session(self.facility, self.scope, params)
        return params, handle


# --------------------------------------------------------------------------- throughput


@dataclass
class FileSet:
    name: str
    folder: str  # the session folder on the microscope's share
    src: Path
    rels: list[str]
    total: int

    @property
    def paths(self) -> list[Path]:
        return [self.src / rel for rel in self.rels]

    def items(self) -> list[dict[str, Any]]:
        """What the watch hands to transfer_batch for each ready file."""
        out = []
        for rel in self.rels:
            st = (self.src / rel).stat()
            out.append({"relpath": to_text(rel), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


def make_movies(site: Site, files: int, mib: int, block: bytes) -> FileSet:
    folder = "bench-movies"
    rels = [
        f"Images-Disc1/GridSquare_1/Data/FoilHole_{i}_Data_2_3_20261124_1200{i:02d}_fractions.tiff"
        for i in range(files)
    ]
    for i, rel in enumerate(rels):
        fill(site.share / folder / rel, mib << 20, i, block)
    name = f"Movies: {files} files x {mib} MiB"
    return FileSet(name, folder, site.share / folder, rels, files * (mib << 20))


def make_small(site: Site, files: int, kib: int, block: bytes) -> FileSet:
    """EPU's per-movie XML and JPG, 50 to a grid square."""
    folder = "bench-small"
    rels = []
    for i in range(files):
        movie = i // 2
        ext = ".xml" if i % 2 == 0 else ".jpg"
        rels.append(
            f"Images-Disc1/GridSquare_{movie // 25}/Data/"
            f"FoilHole_{movie}_Data_2_3_20261124_120000{ext}"
        )
    for i, rel in enumerate(rels):
        fill(site.share / folder / rel, kib << 10, i, block)
    name = f"Small files: {files} files x {kib} KiB (EPU XML + JPG)"
    return FileSet(name, folder, site.share / folder, rels, files * (kib << 10))


@dataclass
class Row:
    label: str
    seconds: float
    cpu: float
    cache: str
    note: str = ""
    streams: int = 0  # > 0: a cryoflow row

    def mbps(self, total: int) -> float:
        return total / self.seconds / 1e6


@dataclass
class Table:
    fileset: FileSet
    rows: list[Row] = field(default_factory=list)

    def find(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)


def measure(label: str, fn: Callable[[], str], cold: bool, streams: int = 0) -> Row:
    dropped = drop_caches() if cold else False
    cpu0 = cpu_seconds()
    t = time.perf_counter()
    note = fn()
    os.sync()
    dt = time.perf_counter() - t
    return Row(label, dt, cpu_seconds() - cpu0, "cold" if dropped else "warm", note, streams)


def cryoflow_copy(site: Site, fs: FileSet, streams: int) -> tuple[str, Callable[[], str], Path]:
    facility = site.with_streams(streams)
    params, handle = site.session(fs.folder, f"s{streams}")
    items = fs.items()
    per_batch = facility.transfer.batch_max_files

    def run() -> str:
        probe = ThreadTime()
        copied, failed = 0, []
        with probe.installed():
            for k in range(0, len(items), per_batch):
                report = transfer_batch(
                    facility, site.scope, handle, items[k : k + per_batch], f"b{k}", params
                )
                copied += len(report.copied)
                failed += report.failed + [{"relpath": r} for r in report.retry_later]
        if copied != len(items):
            raise RuntimeError(f"transfer_batch copied {copied} of {len(items)}: {failed[:3]}")
        s = probe.seconds
        return f"fsync {s['fsync']:.2f}, read-back {s['verify']:.2f}, ledger {s['ledger']:.2f}"

    default = " (configured)" if streams == site.facility.transfer.streams else ""
    label = f"cryoflow transfer_batch, {streams} stream{'s' * (streams > 1)}{default}"
    return label, run, Path(handle.dest_root)


def warm_up(site: Site, fs: FileSet) -> None:
    """One untimed transfer_batch of one file: the ledger's engine, schema and first queries are
    set up once per process, not inside the first measured method."""
    one = FileSet("warm-up", fs.folder, fs.src, fs.rels[:1], 0)
    _, run, dest = cryoflow_copy(site, one, 1)
    run()
    shutil.rmtree(dest)


def throughput(site: Site, work: Path, fs: FileSet, streams_list: list[int]) -> Table:
    cold = os.geteuid() == 0
    table = Table(fs)
    src = fs.src
    warm_up(site, fs)

    def read() -> str:
        read_files(fs.paths)
        return ""

    def cp() -> str:
        subprocess.run(["cp", "-a", str(src), str(work / "cp")], check=True)
        return ""

    def rsync() -> str:
        subprocess.run(["rsync", "-a", f"{src}/", f"{work / 'rsync'}/"], check=True)
        return ""

    def cp_read_back() -> str:
        """What any copy verified at its destination must do at least: cp, the flush, and one
        read of the copy from the storage (its cached pages dropped)."""
        subprocess.run(["cp", "-a", str(src), str(work / "cpv")], check=True)
        os.sync()
        copies = [work / "cpv" / rel for rel in fs.rels]
        for path in copies:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        read_files(copies)
        return "the verification's floor"

    table.rows.append(measure("read-only pass (Python readinto)", read, cold))
    table.rows.append(measure("cp -a", cp, cold))
    shutil.rmtree(work / "cp")
    if shutil.which("rsync"):
        table.rows.append(measure("rsync -a", rsync, cold))
        shutil.rmtree(work / "rsync")
    table.rows.append(measure("cp -a, sync, copy read back from storage", cp_read_back, cold))
    shutil.rmtree(work / "cpv")
    for streams in streams_list:
        label, run, dest = cryoflow_copy(site, fs, streams)
        table.rows.append(measure(label, run, cold, streams))
        shutil.rmtree(dest)
    os.sync()
    return table


def print_table(table: Table, where: Path) -> None:
    fs = table.fileset
    print(f"\n{fs.name} = {fs.total / 1e6:.1f} MB, on {where} ({fs_type(where)})")
    cp = table.find("cp -a")
    print(f"  {'method':<48} {'s':>7} {'MB/s':>8} {'x cp':>6} {'CPU s':>6}  source  notes")
    for r in table.rows:
        ratio = f"{cp.seconds / r.seconds:6.2f}" if cp else "     -"
        print(
            f"  {r.label:<48} {r.seconds:7.2f} {r.mbps(fs.total):8.1f} {ratio} {r.cpu:6.2f}"
            f"  {r.cache:<6}  {r.note}"
        )
    if shutil.which("rsync") is None:
        print("  rsync -a: not installed (apt-get install rsync)")
    rsync = table.find("rsync -a")
    for r in (r for r in table.rows if r.streams > 1):
        vs_cp = cp.seconds / r.seconds if cp else float("nan")
        parts = [f"{vs_cp:.2f}x cp (goal >= 0.9: {'MET' if vs_cp >= 0.9 else 'NOT MET'})"]
        if rsync:
            vs_rsync = rsync.seconds / r.seconds
            parts.append(
                f"{vs_rsync:.2f}x rsync -a (goal > 1: {'MET' if vs_rsync > 1 else 'NOT MET'})"
            )
        print(f"  goals, {r.streams} streams: " + "; ".join(parts))
    ncpu = os.cpu_count() or 1
    print(
        f"  (CPU s: process + children, of at most {ncpu} x wall. Notes: thread-seconds summed "
        "over streams in the\n   file + folder fsyncs, the post-fsync read-back verification, "
        "and the ledger's begin_copies + mark_verified_many)"
    )


# --------------------------------------------------------------------------- read-back


def readback(work: Path, mib: int, block: bytes) -> None:
    """Where the verification's read-back comes from, inside a real copy_verified."""
    src, dst = work / "probe" / "src.bin", work / "probe" / "out" / "dst.bin"
    fill(src, mib << 20, 1, block)
    cold = drop_caches()
    seen: dict[str, float | None] = {}
    original = transfer_module.file_checksum

    def probe(path: Path, *args: Any, **kwargs: Any) -> str:
        seen["after_fsync"] = resident_fraction(path)
        with open(path, "rb") as fh:  # the same advice the product gives, then look
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        seen["after_dontneed"] = resident_fraction(path)
        t = time.perf_counter()
        try:
            return original(path, *args, **kwargs)
        finally:
            seen["verify_s"] = time.perf_counter() - t

    transfer_module.file_checksum = probe
    try:
        t = time.perf_counter()
        copy_verified(src, dst)
        whole = time.perf_counter() - t
    finally:
        transfer_module.file_checksum = original
    t = time.perf_counter()
    file_checksum(dst)
    warm = time.perf_counter() - t
    cold_s = None
    if drop_caches():
        t = time.perf_counter()
        file_checksum(dst)
        cold_s = time.perf_counter() - t
    size = mib << 20

    def pct(x: float | None) -> str:
        return "?" if x is None else f"{100 * x:.0f}%"

    def rate(s: float) -> str:
        return f"{size / s / 1e6:.0f} MB/s"

    print(f"\nVerification read-back: one copy_verified of {mib} MiB on {work} ({fs_type(work)})")
    print(
        f"  copy_verified {whole:.2f} s ({'cold' if cold else 'warm'} source); pages of the "
        f"written temp file in the page cache after fsync: {pct(seen['after_fsync'])}, after "
        f"POSIX_FADV_DONTNEED: {pct(seen['after_dontneed'])}"
    )
    line = (
        f"  read-back {seen['verify_s']:.2f} s = {rate(seen['verify_s'])}; warm read {rate(warm)}"
    )
    print(line + (f"; cold read (caches dropped) {rate(cold_s)}" if cold_s else ""))
    after = seen["after_dontneed"]
    if after is not None and after < 0.05:
        print(
            "  -> the read-back reads the storage (DONTNEED evicted the clean pages after fsync): "
            "every copied byte is read twice from disk"
        )
    elif after is not None:
        print(
            "  -> the read-back is served (partly) by the page cache: DONTNEED did not evict "
            "(tmpfs keeps its pages; dirty pages are not dropped)"
        )
    print(
        "  (on GPFS the read-back may still come from the GPFS pagepool, which fadvise does not "
        "manage; this measures the Linux page cache only)"
    )


# --------------------------------------------------------------------------- latency


def latency(site: Site, movies: int, frames: int = 40, frame_mib: int = 4) -> None:
    """A detector writing TIFF frames; the DAG's watch trigger and ingest_event copy them."""
    import numpy as np
    import tifffile

    from cryoflow.operators.ingest_batch import watch_trigger  # imports Airflow

    logging.getLogger("cryoflow").setLevel(logging.WARNING)  # Airflow's handlers print INFO
    params, handle = site.session("bench-latency", "latency", frames=frames)
    share = Path(handle.source_root)
    share.mkdir(parents=True, exist_ok=True)
    side = int((frame_mib << 20) ** 0.5)
    frame = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8)
    finished: dict[str, float] = {}

    def writer() -> None:  # 40 frames of 4 MiB over ~2 s, one movie every ~3 s
        for i in range(movies):
            rel = f"Images-Disc1/GridSquare_1/Data/FoilHole_{i}_Data_2_3_20261124_1200{i:02d}_fractions.tiff"  # noqa: E501
            (share / rel).parent.mkdir(parents=True, exist_ok=True)
            with tifffile.TiffWriter(share / rel) as tif:
                for _ in range(frames):
                    tif.write(frame, contiguous=False)
                    tif.filehandle.flush()
                    time.sleep(0.05)
            finished[rel] = time.time()
            time.sleep(1.0)

    thread = threading.Thread(target=writer)
    thread.start()
    detected: dict[str, float] = {}
    verified: dict[str, float] = {}
    deadline = time.monotonic() + 60 + movies * 10
    batches = 0
    while len(verified) < movies and time.monotonic() < deadline:
        trigger = watch_trigger(site.facility, site.scope, params, handle)
        trigger._log = logging.getLogger("cryoflow.bench")  # quiet (Airflow's is structlog)
        state = trigger._start()
        while (outcome := trigger._poll(state)).status == "wait":
            if time.monotonic() > deadline:
                break
            time.sleep(trigger.poll_seconds)
        if outcome.status != "ready":
            continue
        seen_at = time.time()
        batches += 1
        report = ingest_event(
            site.facility, site.scope, handle, outcome.payload(), f"b{batches}", params
        )
        done_at = time.time()
        for entry in report.copied:
            detected[entry["relpath"]] = seen_at
            verified[entry["relpath"]] = done_at
    thread.join()
    names = [n for n in verified if n in finished]
    if not names:
        print("\nDetection latency: nothing verified in time")
        return
    total = sorted(verified[n] - finished[n] for n in names)
    detect = [detected[n] - finished[n] for n in names]
    copy = [verified[n] - detected[n] for n in names]
    print(
        f"\nDetection latency (last byte written -> verified), watch trigger + ingest_event, "
        f"{len(names)}/{movies} TIFF movies of {frames * frame_mib} MiB in {batches} batches,"
    )
    print(
        f"  settle {site.facility.transfer.settle_seconds} s, poll "
        f"{site.facility.transfer.poll_seconds} s: mean {statistics.mean(total):.2f} s, "
        f"min {total[0]:.2f} s, max {total[-1]:.2f} s; of which detection "
        f"{statistics.mean(detect):.2f} s, copy + verify {statistics.mean(copy):.2f} s "
        f"(floor = settle + up to one poll + copy time)"
    )


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--files", type=int, default=8, help="movies in the movie set")
    p.add_argument("--mib", type=int, default=128, help="size of each movie")
    p.add_argument("--small-files", type=int, default=400)
    p.add_argument("--small-kib", type=int, default=256)
    p.add_argument(
        "--streams", default="1,4", help="stream counts to run (the configured one is added)"
    )
    p.add_argument(
        "--chunk-mib", type=int, default=None, help="copy buffer (default: the configured one)"
    )
    p.add_argument("--movies", type=int, default=5, help="movies written for the latency part")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--dir", type=Path, default=None, help="where to write (the target filesystem)")
    p.add_argument(
        "--ledger-url",
        default=None,
        help="ledger database (default: SQLite in the --dir folder, on the data disk)",
    )
    args = p.parse_args()
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := set(parts) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cryoflow-bench-") as tmp:
        root = Path(tmp)
        site = Site(root, args.settle, args.poll, args.ledger_url)
        if args.chunk_mib:
            site.with_transfer(chunk_mib=args.chunk_mib)
        streams = sorted(
            {*(int(s) for s in args.streams.split(",")), site.facility.transfer.streams}
        )
        block = os.urandom(1 << 20)
        work = root / "work"
        work.mkdir()
        cold = os.geteuid() == 0
        print(
            f"cryoflow transfer benchmark: {os.cpu_count()} CPUs, {root} ({fs_type(root)}), "
            f"{'page cache dropped before each method' if cold else 'not root: warm caches'}, "
            f"copy buffer {site.facility.transfer.chunk_mib} MiB, "
            f"ledger {site.facility.storage.ledger_url}"
        )
        for part in ("movies", "small"):
            if part not in parts:
                continue
            if part == "movies":
                fs = make_movies(site, args.files, args.mib, block)
            else:
                fs = make_small(site, args.small_files, args.small_kib, block)
            print_table(throughput(site, work, fs, streams), root)
            shutil.rmtree(fs.src)
        if "readback" in parts:
            readback(work, args.mib, block)
        if "latency" in parts:
            latency(site, args.movies)


if __name__ == "__main__":
    main()
