"""Benchmark of the built-in motion-correction engine on detector-sized synthetic movies.

Prints, per movie size: seconds per movie, the FFT floor measured on this machine, peak memory,
and the drift error against the known truth next to a plain whole-frame cross-correlation
baseline (scikit-image's phase_cross_correlation when installed, else our own upsampled one).

    .venv/bin/python benchmarks/bench_engines_motioncor.py            # K3 and Falcon, ~10 min
    .venv/bin/python benchmarks/bench_engines_motioncor.py --quick    # 1024 px only
    .venv/bin/python benchmarks/bench_engines_motioncor.py --local --k3-only --std 0.02 0.01

``--local``: movies with a smooth local deformation (2 px,
:mod:`cryoflow.processing.engines.synthetic_motion`)
at a realistic image std; each is summed globally and with ``-Patch 5 5 -Group 1 4``, and the
sums are compared with the noise-free specimen (band correlation), the trajectories with the
truth (drift error; local shift error at the patch centres). Peak memory is the engine
process's own (maxrss), next to the movie's size on disk and as uint8 frames. The FFT floor
counts the second streaming pass (one more forward FFT per frame, or the correction tiles).

FFT floor: whatever the algorithm, each frame must be Fourier transformed once at full size
(exact sub-pixel shifts and Fourier binning need the spectrum), the sum needs one inverse
transform per output (sum, _DW sum), and each alignment iteration needs at least one inverse
correlation transform per frame on the alignment grid. The floor is those transforms alone,
timed with the same library (scipy.fft, all cores) on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy.fft as sfft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from cryoflow.processing.engines import motioncor as mc  # noqa: E402
from cryoflow.processing.engines import synthetic as syn  # noqa: E402
from cryoflow.processing.engines import synthetic_motion as smo  # noqa: E402
from cryoflow.processing.engines.ctf_model import CTFParams  # noqa: E402

SIZES = {
    "K3 5760x4092 x40": (4092, 5760, 40),
    "Falcon 4096x4096 x40": (4096, 4096, 40),
}


def make_movie(ny: int, nx: int, n: int, contrast: float, seed: int, out: Path) -> np.ndarray:
    """Write a counting TIFF at 1 e/px/frame (0.83 A/px, 150 A particles); return true shifts."""
    rng = np.random.default_rng(seed)
    pad, pixel = 32, 0.83
    area = (ny * nx) / (1024 * 1024)
    dens, _ = syn.make_specimen(
        (ny + 2 * pad, nx + 2 * pad),
        pixel,
        n_particles=int(7 * area),
        diameter_A=150.0,
        n_contaminants=max(1, int(area / 8)),
        contaminant_diameter_A=500.0,
        rng=rng,
    )
    img = contrast * syn.apply_ctf(dens, pixel, CTFParams(15000.0, 14500.0, 30.0))
    del dens
    drift = syn.default_drift(n, 15.0, rng)
    frames, truth = syn.make_movie(
        img, n_frames=n, dose_per_frame=1.0, drift=drift, rng=rng, out_shape=(ny, nx)
    )
    syn.write_movie_tiff(out, frames)
    return truth.shifts_px


def fft_floor(ny: int, nx: int, n: int, xcf: tuple[int, int], iters: int) -> dict[str, float]:
    """Seconds for the transforms any implementation of this algorithm must do."""
    a = np.random.default_rng(0).random((ny, nx), dtype=np.float32)
    t = time.perf_counter()
    spec = sfft.rfft2(a, workers=mc.fft_workers())
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    sfft.irfft2(spec, s=(ny, nx), workers=mc.fft_workers())
    inv = time.perf_counter() - t
    small = np.random.default_rng(1).random(xcf, dtype=np.float32)
    sspec = sfft.rfft2(small)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        sfft.irfft2(sspec, s=xcf, workers=mc.fft_workers())
    cc = (time.perf_counter() - t) / reps
    return {
        "forward_full_s": n * fwd,
        "inverse_sums_s": 2 * inv,
        "cc_per_iteration_s": n * cc,
        "floor_s": n * fwd + 2 * inv + iters * n * cc,
    }


def run_engine(movie: Path, out_dir: Path, patch: int = 0, group: int = 1) -> dict:
    """Run the engine in a fresh process: its wall time and peak memory are then its own."""
    code = f"""
import json, resource, sys, time, tracemalloc
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "plugins")!r})
from pathlib import Path
from cryoflow.processing.engines import motioncor as mc
tracemalloc.start()
t = time.perf_counter()
out = Path({str(out_dir)!r})
res = mc.run(mc.MotionCorParams(in_path=Path({str(movie)!r}), out_mrc=out / "s{patch}.mrc",
             pixel_size_A=0.83, fm_dose=1.0 / 0.83**2, log_dir=out, patch=({patch}, {patch}),
             group=(1, {group}), preview=False))
wall = time.perf_counter() - t
local = None
if res.local_motion is not None:
    x, y = res.patch_centres.T
    local = {{"centres": res.patch_centres.tolist(),
             "shifts": res.local_motion.shifts(x, y).tolist(),
             "rms_residual_px": res.local_motion.rms_residual_px, "applied": res.local_applied}}
print(json.dumps({{"wall_s": wall, "iterations": res.iterations, "shifts": res.shifts_px.tolist(),
    "sum": str(res.sum_path), "local": local,
    "tracemalloc_peak_gb": tracemalloc.get_traced_memory()[1] / 1e9,
    "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def band_correlation(a: np.ndarray, b: np.ndarray, lo: float, hi: float) -> float:
    """Correlation of two images over the spatial-frequency band lo..hi cycles/px (an FRC
    over one wide ring): how much of the specimen's detail at that resolution a sum keeps."""
    f = np.hypot(
        *np.meshgrid(np.fft.fftfreq(a.shape[0]), np.fft.rfftfreq(a.shape[1]), indexing="ij")
    )
    band = (f > lo) & (f < hi)
    fa, fb = sfft.rfft2(a)[band], sfft.rfft2(b)[band]
    den = np.sqrt((abs(fa) ** 2).sum() * (abs(fb) ** 2).sum())
    return float((fa * np.conj(fb)).real.sum() / den)


def local_bench(
    label: str, ny: int, nx: int, n: int, contrast_std: float, patch: int, group: int = 1
) -> None:
    """Global-only vs -Patch sums on a movie with a smooth local deformation (2 px)."""
    import mrcfile

    with tempfile.TemporaryDirectory(prefix="bench_mc_local_") as tmp:
        movie = Path(tmp) / "movie.tiff"
        t = time.perf_counter()
        frames, truth, still = smo.make_local_motion_movie(
            (ny, nx), n, pixel_A=0.83, contrast_std=contrast_std, drift_px=15.0, local_px=2.0,
            rng=np.random.default_rng(3),
        )  # fmt: skip
        syn.write_movie_tiff(movie, frames)
        raw_gb = frames.nbytes / 1e9
        del frames
        gen = time.perf_counter() - t
        disk_gb = movie.stat().st_size / 1e9
        print(
            f"\n== local motion, {label}, image std {contrast_std:.1%} (movie written in "
            f"{gen:.0f} s; {disk_gb:.2f} GB on disk, {raw_gb:.2f} GB as uint8 frames)"
        )
        bexp = 500.0 * mc._xcf_bin((ny, nx)) ** 2
        rows = {}
        for p in (0, patch):
            res = run_engine(movie, Path(tmp), p, group)
            img = mrcfile.read(res["sum"]).astype(np.float32)
            rows[p] = res
            floor = fft_floor(ny, nx, n, mc._xcf_grid((ny, nx), bexp), res["iterations"])
            tiles = 0.0
            if p:
                hop = mc._tile_hop((ny, nx))
                t_ = hop * 4 // 3
                start = -(t_ - hop) // 2
                n_tiles = len(range(start, ny, hop)) * len(range(start, nx, hop))
                a = np.random.default_rng(2).random((n_tiles, t_, t_), dtype=np.float32)
                t0 = time.perf_counter()
                sfft.rfft2(a, workers=mc.fft_workers())
                tiles = n * (time.perf_counter() - t0)
                del a
            # Pass 2 re-reads and re-transforms every frame (streaming): one more forward FFT.
            fl = floor["floor_s"] + (tiles if p else floor["forward_full_s"])
            err = mc.trajectory_rms_error(np.asarray(res["shifts"]), truth.shifts_px)
            cc = [band_correlation(img, still, lo, hi) for lo, hi in ((0.05, 0.15), (0.15, 0.3))]
            name = f"-Patch {p} {p} -Group 1 {group}" if p else "global only"
            print(
                f"{name}: {res['wall_s']:.1f} s/movie (FFT floor {fl:.1f} s incl. the second "
                f"pass{' and correction tiles' if p else ''}), maxrss {res['maxrss_gb']:.2f} GB "
                f"({res['maxrss_gb'] / disk_gb:.1f}x disk, {res['maxrss_gb'] / raw_gb:.1f}x "
                f"uint8 frames), tracemalloc {res['tracemalloc_peak_gb']:.2f} GB"
            )
            print(
                f"  drift RMS error {err:.3f} px; sum vs truth, band correlation 0.05-0.15 "
                f"{cc[0]:.3f}, 0.15-0.3 cycles/px {cc[1]:.3f}"
            )
            loc = res["local"]
            if loc is not None:
                c = np.asarray(loc["centres"])
                est = np.asarray(res["shifts"])[:, None, :] + np.asarray(loc["shifts"])
                true = truth.displacement(c[:, 0], c[:, 1])
                d = est - true
                d -= d.mean(axis=0)  # each patch's own reference offset
                g = np.asarray(res["shifts"])[:, None, :] - true
                g -= g.mean(axis=0)
                print(
                    f"  local shift RMS error at {len(c)} patch centres: "
                    f"{np.sqrt((d**2).sum(-1).mean()):.3f} px (global-only model "
                    f"{np.sqrt((g**2).sum(-1).mean()):.3f} px); fit residual "
                    f"{loc['rms_residual_px']:.3f} px; model applied to the sum: {loc['applied']}"
                )


def baseline(movie: Path) -> tuple[np.ndarray, float, str]:
    """Whole-frame sub-pixel cross-correlation of each frame against the sum of the others,
    one pass, no iteration (the simplest method a person would write)."""
    import tifffile

    try:
        from skimage.registration import phase_cross_correlation

        def register(ref: np.ndarray, mov: np.ndarray) -> tuple[float, float]:
            (dy, dx), _, _ = phase_cross_correlation(
                ref, mov, upsample_factor=20, normalization=None
            )
            return -dx, -dy

        name = "skimage.registration.phase_cross_correlation(upsample 20, no whitening)"
    except ImportError:  # pragma: no cover - depends on the environment

        def register(ref: np.ndarray, mov: np.ndarray) -> tuple[float, float]:
            cc = sfft.irfft2(sfft.rfft2(mov) * np.conj(sfft.rfft2(ref)), s=ref.shape)
            return mc.find_peak(cc, min(ref.shape) / 4)

        name = "own whole-frame CC (3-point Gaussian peak)"
    frames = tifffile.imread(movie)
    t = time.perf_counter()
    total = frames.sum(axis=0, dtype=np.float32)
    shifts = []
    for f in frames:
        f32 = f.astype(np.float32)
        shifts.append(register(total - f32, f32))
    return np.asarray(shifts), time.perf_counter() - t, name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1024 px x 24 frames only")
    ap.add_argument("--contrast", type=float, default=0.3, help="specimen contrast scale")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--local", action="store_true", help="local-motion movies at realistic image std"
    )
    ap.add_argument("--std", type=float, nargs="+", default=[0.01, 0.02], help="image std")
    ap.add_argument("--patch", type=int, default=5)
    ap.add_argument("--k3-only", action="store_true")
    ap.add_argument("--group", type=int, default=4, help="-Group 1 N for patch alignment")
    args = ap.parse_args()
    if args.local:
        print(f"cores: {os.cpu_count()}, scipy.fft workers: {mc.fft_workers()}")
        sizes = {"test-size 1024x1024 x24": (1024, 1024, 24)} if args.quick else dict(SIZES)
        if args.k3_only and not args.quick:
            sizes.pop("Falcon 4096x4096 x40")
        for label, (ny, nx, n) in sizes.items():
            for std in args.std:
                local_bench(label, ny, nx, n, std, args.patch, args.group)
        return 0
    sizes = {"test-size 1024x1024 x24": (1024, 1024, 24)} if args.quick else SIZES
    workers = mc.fft_workers()
    print(f"cores: {os.cpu_count()}, scipy.fft workers: {workers}, contrast {args.contrast}")
    for label, (ny, nx, n) in sizes.items():
        with tempfile.TemporaryDirectory(prefix="bench_mc_") as tmp:
            movie = Path(tmp) / "movie.tiff"
            t = time.perf_counter()
            true = make_movie(ny, nx, n, args.contrast, 1, movie)
            gen = time.perf_counter() - t
            res = run_engine(movie, Path(tmp))
            est = np.asarray(res["shifts"])
            bexp = 500.0 * mc._xcf_bin((ny, nx)) ** 2
            floor = fft_floor(ny, nx, n, mc._xcf_grid((ny, nx), bexp), res["iterations"])
            print(
                f"\n== {label} (movie written in {gen:.0f} s, {movie.stat().st_size / 1e6:.0f} MB)"
            )
            print(f"engine: {res['wall_s']:.1f} s/movie, {res['iterations']} iterations")
            print(
                f"  FFT floor: {floor['floor_s']:.1f} s (full forward {floor['forward_full_s']:.1f}"
                f" + inverse sums {floor['inverse_sums_s']:.1f} + CC"
                f" {floor['cc_per_iteration_s']:.2f}/iteration); engine = "
                f"{res['wall_s'] / floor['floor_s']:.1f} x floor (the rest: TIFF decode, gain,"
                " phase ramps, dose weights, MRC/PNG writing)"
            )
            print(
                f"  peak memory: maxrss {res['maxrss_gb']:.2f} GB, tracemalloc "
                f"{res['tracemalloc_peak_gb']:.2f} GB"
            )
            print(f"  drift RMS error: {mc.trajectory_rms_error(est, true):.3f} px")
            if not args.no_baseline:
                tracemalloc.start()
                bshifts, bsec, name = baseline(movie)
                bpeak = tracemalloc.get_traced_memory()[1] / 1e9
                tracemalloc.stop()
                print(
                    f"baseline {name}: {bsec:.1f} s, drift RMS error "
                    f"{mc.trajectory_rms_error(bshifts, true):.3f} px, tracemalloc {bpeak:.2f} GB"
                )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\nbenchmark process maxrss (generation + baseline): {rss:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
