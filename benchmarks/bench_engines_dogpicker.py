"""Benchmark the built-in DoG picker on K3- and Falcon-sized micrographs with known particles.

Prints, per micrograph:

* seconds for ``pick()`` (median of 3 runs) and for the whole command (read MRC, pick, write
  STAR, text file and preview), next to the FFT floor: one real FFT of the full micrograph
  (scipy.fft, one thread). That is the least any picker that filters the full image in Fourier
  space pays.
* peak memory: numpy/scipy allocations during ``pick()`` (tracemalloc), and the command's peak
  resident set (VmHWM; the interpreter and its libraries, shown in brackets, included).
* precision, recall and F1 (one pick per particle, within 0.3 diameters) for this picker with its
  defaults, and for scikit-image's ``blob_dog`` on the same micrographs. blob_dog gets the same
  help: the same binned and inverted image, sigmas bracketing the particle, and the threshold
  that gave it the best F1 on two separate calibration micrographs.

Micrographs come from ``synthetic.make_micrograph``: 180 A projected spheres at 1.0 A/px, CTF at
1.5 um, Poisson counts at 50 e/A^2, contrast 0.15. The "dirty" ones add dense specks (36 A,
density 4) and contaminants (720 A, density 3).

scikit-image is needed for the comparison only; the product does not import it. Install it with
``.venv/bin/uv pip install --python .venv/bin/python scikit-image``.

Run: ``.venv/bin/python benchmarks/bench_engines_dogpicker.py`` (``--quick``: Falcon, clean only).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy import fft as sfft

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from cryoflow.engines import synthetic as syn  # noqa: E402
from cryoflow.engines.ctf_model import CTFParams  # noqa: E402
from cryoflow.engines.dogpicker import (  # noqa: E402
    DogSettings,
    MatchResult,
    _bin_image,
    match_picks,
    pick,
)
from cryoflow.engines.imageio import write_mrc  # noqa: E402

APIX = 1.0
DIAM_A = 180.0
TOL_PX = 0.3 * DIAM_A / APIX
CTF = CTFParams(defocus1_A=15_150.0, defocus2_A=14_850.0, astig_angle_deg=30.0)
DOSE = 50.0 * APIX**2
CONTRAST = 0.15
SETTINGS = DogSettings(diameter_A=DIAM_A, pixel_size_A=APIX, invert=True)

CAMERAS = {"K3": (4092, 5760), "Falcon": (4096, 4096)}
#: (particles, specks, contaminants) per camera and condition.
CONTENT = {
    ("K3", "clean"): (180, 0, 0),
    ("K3", "dirty"): (150, 400, 3),
    ("Falcon", "clean"): (120, 0, 0),
    ("Falcon", "dirty"): (100, 280, 2),
}


def make(shape: tuple[int, int], seed: int, n: int, specks: int, cont: int):
    return syn.make_micrograph(
        shape,
        APIX,
        CTF,
        dose_total=DOSE,
        contrast=CONTRAST,
        rng=np.random.default_rng(seed),
        diameter_A=DIAM_A,
        n_particles=n,
        n_specks=specks,
        n_contaminants=cont,
    )


def truth_xy(truth: syn.SpecimenTruth) -> np.ndarray:
    return np.array([[p.x, p.y] for p in truth.particles])


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def traced_peak_mb(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def fft_floor(image: np.ndarray) -> float:
    img = np.ascontiguousarray(image, dtype=np.float32)
    return median_time(lambda: sfft.rfft2(img, workers=1))


# --------------------------------------------------------------------------- scikit-image


def blob_dog_picks(image: np.ndarray, threshold: float) -> np.ndarray:
    """blob_dog on the picker's binned, inverted, standardised image; (x, y) input pixels."""
    from skimage.feature import blob_dog

    b = SETTINGS.binning()
    binned = -_bin_image(image, b)
    binned = (binned - binned.mean()) / binned.std()
    r = SETTINGS.radius_px / b
    blobs = blob_dog(
        binned,
        min_sigma=0.5 * r / math.sqrt(2),
        max_sigma=1.5 * r / math.sqrt(2),
        threshold=threshold,
        overlap=0.5,
    )
    half = (b - 1) / 2.0
    return np.column_stack([blobs[:, 1] * b + half, blobs[:, 0] * b + half]).reshape(-1, 2)


def tune_blob_dog(calibration: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The blob_dog threshold with the best mean F1 on the calibration micrographs."""
    best = (-1.0, 0.0)
    for threshold in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2):
        f1 = statistics.mean(
            match_picks(blob_dog_picks(img, threshold), xy, TOL_PX).f1 for img, xy in calibration
        )
        best = max(best, (f1, threshold))
    return best[1], best[0]


# --------------------------------------------------------------------------- the command


def run_command(image: np.ndarray, workdir: Path) -> tuple[float, float, float]:
    """(seconds in main(), peak resident MB, resident MB after the imports, before main())."""
    mic = workdir / "mic.mrc"
    write_mrc(mic, image, pixel_size_A=APIX)
    # Imports come before the clock starts: pandas alone takes 2.4 s here, where
    # PYTHONDONTWRITEBYTECODE=1 makes every process compile it from source. Peak memory is
    # VmHWM, since ru_maxrss would also count the pages of the (large) benchmark process forked.
    probe = (
        "import sys, time\n"
        "import pandas, starfile, PIL.Image, PIL.ImageDraw\n"
        "from cryoflow.engines.dogpicker import main\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n"
        "base = hwm()\n"
        "t = time.perf_counter(); rc = main(sys.argv[1:]); dt = time.perf_counter() - t\n"
        "print('BENCH', dt, hwm(), base, file=sys.stderr); sys.exit(rc)\n"
    )
    argv = [
        sys.executable,
        "-c",
        probe,
        "-i",
        str(mic),
        "-o",
        str(workdir / "p.txt"),
        "--star",
        str(workdir / "p.star"),
        "--preview",
        str(workdir / "p.jpg"),
        "-d",
        str(DIAM_A),
        "--invert",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("BENCH"))
    _, dt, peak, base = line.split()
    return float(dt), int(peak) / 1024, int(base) / 1024


# --------------------------------------------------------------------------- main


def fmt(m: MatchResult) -> str:
    return f"{m.precision:.3f} {m.recall:.3f} {m.f1:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Falcon, clean micrograph only")
    args = parser.parse_args()
    try:
        import skimage
    except ImportError:
        print("scikit-image is needed for the comparison; see the module doc", file=sys.stderr)
        return 2

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__},"
        f" scikit-image {skimage.__version__}; {os.cpu_count()} CPUs; {platform.machine()}"
    )
    print(
        f"particles {DIAM_A:.0f} A at {APIX} A/px, CTF {CTF.defocus1_A:.0f}/{CTF.defocus2_A:.0f}"
        f" A, {DOSE / APIX**2:.0f} e/A^2, contrast {CONTRAST}; bin {SETTINGS.binning()}"
    )

    t0 = time.perf_counter()
    calibration = []
    for seed, (n, sp, co) in ((101, (30, 0, 0)), (102, (25, 60, 1))):
        img, truth = make((2048, 2048), seed, n, sp, co)
        calibration.append((img, truth_xy(truth)))
    threshold, cal_f1 = tune_blob_dog(calibration)
    print(
        f"blob_dog threshold {threshold} (best mean F1 {cal_f1:.3f} on 2 calibration "
        f"micrographs, {time.perf_counter() - t0:.0f} s)\n"
    )

    header = (
        f"{'micrograph':<16}{'picks/true':>11}{'pick s':>8}{'cmd s':>7}{'FFT s':>7}"
        f"{'pick MB':>9}{'cmd RSS MB':>11}   {'DoG P R F1':<18}{'blob_dog P R F1':<18}"
        f"{'blob s':>7}{'blob MB':>8}"
    )
    print(header)
    print("-" * len(header))
    cases = [("Falcon", "clean")] if args.quick else list(CONTENT)
    for i, (cam, cond) in enumerate(cases):
        n, sp, co = CONTENT[(cam, cond)]
        image, truth = make(CAMERAS[cam], 200 + i, n, sp, co)
        xy_true = truth_xy(truth)
        picks = pick(image, SETTINGS)
        ours = match_picks(np.column_stack([picks.x, picks.y]), xy_true, TOL_PX)
        t_pick = median_time(lambda image=image: pick(image, SETTINGS))
        mb_pick = traced_peak_mb(lambda image=image: pick(image, SETTINGS))
        t_fft = fft_floor(image)
        with tempfile.TemporaryDirectory() as tmp:
            t_cmd, rss, rss_base = run_command(image, Path(tmp))
        blob_xy = blob_dog_picks(image, threshold)
        theirs = match_picks(blob_xy, xy_true, TOL_PX)
        t_blob = median_time(lambda image=image: blob_dog_picks(image, threshold), repeats=1)
        mb_blob = traced_peak_mb(lambda image=image: blob_dog_picks(image, threshold))
        name = f"{cam} {image.shape[1]}x{image.shape[0]} {cond}"
        print(
            f"{name:<28}{len(picks):>4}/{len(xy_true):<4}{t_pick:>6.2f}{t_cmd:>7.2f}"
            f"{t_fft:>7.2f}{mb_pick:>9.0f}{rss:>7.0f}({rss_base:.0f})   {fmt(ours):<18}"
            f"{fmt(theirs):<18}{t_blob:>7.2f}{mb_blob:>8.0f}"
        )
    print(
        "\npick s: pick() on the array; cmd s: main() incl. MRC read and STAR/txt/preview writes"
        " (imports warm);"
        "\nFFT s: one scipy.fft.rfft2 of the full micrograph (1 thread); pick MB: tracemalloc "
        "peak in pick();\ncmd RSS MB: peak resident set of the command (after the imports, before "
        "main(), in brackets)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
