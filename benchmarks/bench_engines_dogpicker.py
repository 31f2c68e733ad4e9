"""Benchmark the built-in DoG picker per kind of micrograph, next to scikit-image's blob_dog.

Prints:

* per category (clean, each kind of ``synthetic.Distractors``, a mix, low contrasts named by
  the particle contrast they give, as a fraction of the pixel std):
  precision, recall and F1 (one pick per particle, within 0.3 diameters) and seconds per
  micrograph for this picker with its defaults (thresholds adapt to each micrograph), and for
  ``blob_dog`` at the threshold that gave it the best F1 *on that very micrograph* (hindsight:
  the most it could do). blob_dog gets the same help: the picker's binned, inverted image,
  standardised, and sigmas bracketing the particle. For the low-contrast rows a matched filter
  with the exact CTF-filtered particle (no noise whitening), at its hindsight threshold, shows
  what a template-matching picker would reach at that signal-to-noise ratio.
* speed: ``pick()`` wall and CPU seconds on Falcon (4096x4096) and K3 (5760x4092) micrographs,
  the whole command (read MRC, pick, write STAR, text and preview), and how soon the command
  starts working: ``--help``, and a run that stops at reading a missing file (all its imports
  done).

Truth counts only particles in clean ice (aggregate members and particles on carbon do not
count, see ``synthetic.SpecimenTruth``). Micrographs: 180 A projected spheres at 1.0 A/px, CTF
at 1.5 um, 50 e/A^2; "particle contrast" is ``synthetic.particle_contrast`` (darkening at the
particle centres over the pixel std of the micrograph). The same contrast in the two other usual
units, as fractions of the mean intensity, stands beside it: "dark %" (that darkening over the
mean) and "std %" (the noise-free specimen image's std over the mean). At 1 A/px and 50 e/px
a pixel's shot noise is 14 % of the mean, so "low 2%" of the pixel std is a darkening of about
0.3 % of the mean.

scikit-image is needed for the comparison only (the ``bench`` extra); the product does not import
it. Run: ``.venv/bin/python benchmarks/bench_engines_dogpicker.py`` (``--quick``: 2048x2048
micrographs, no K3, ~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from cryoflow.processing.engines import synthetic as syn  # noqa: E402
from cryoflow.processing.engines.ctf_model import CTFParams  # noqa: E402
from cryoflow.processing.engines.dogpicker import (  # noqa: E402
    DogSettings,
    MatchResult,
    _bin_image,
    match_picks,
    pick,
)
from cryoflow.processing.engines.imageio import write_mrc  # noqa: E402

APIX = 1.0
DIAM_A = 180.0
TOL_PX = 0.3 * DIAM_A / APIX
CTF = CTFParams(defocus1_A=15_150.0, defocus2_A=14_850.0, astig_angle_deg=30.0)
DOSE = 50.0 * APIX**2
SETTINGS = DogSettings(diameter_A=DIAM_A, pixel_size_A=APIX, invert=True)
D = syn.Distractors

#: name -> (distractors, contrast, particles per 4096^2).
CATEGORIES: dict[str, tuple[syn.Distractors | None, float, int]] = {
    "clean": (None, 0.15, 80),
    "carbon": (D(carbon=True, carbon_particles=25), 0.1, 60),
    "ethane": (D(n_ethane=4), 0.1, 70),
    "aggregates": (D(n_aggregates=6), 0.1, 70),
    "junk": (D(n_junk=400), 0.1, 80),
    "gradient": (D(gradient=0.3), 0.1, 80),
    "ice": (D(ice=0.3), 0.1, 80),
    "mix": (
        D(
            carbon=True,
            carbon_particles=12,
            n_ethane=3,
            n_aggregates=4,
            n_junk=150,
            gradient=0.2,
            ice=0.2,
        ),
        0.1,
        50,
    ),
    # particle contrast 3.5 ... 2 % of the pixel std (0.5 ... 0.3 % of the mean)
    "low 3.5%": (None, 0.075, 80),
    "low 3%": (None, 0.064, 80),
    "low 2.5%": (None, 0.053, 80),
    "low 2%": (None, 0.042, 80),
    # 3 % and 2 % darkening at the particle centres, as a fraction of the mean intensity
    "dark 3%": (D(ice=0.1), 0.45, 80),
    "dark 2%": (D(ice=0.1), 0.30, 80),
}
CAMERAS = {"Falcon": (4096, 4096), "K3": (4092, 5760)}
BLOB_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2)


def make(name: str, shape: tuple[int, int], seed: int):
    """One micrograph of a category, its truth and its noise-free fractional contrast image."""
    dis, contrast, n = CATEGORIES[name]
    f = shape[0] * shape[1] / 4096**2
    n = max(4, int(n * f))
    if dis is not None and f < 1:  # the same crowding on a smaller micrograph
        counts = ("carbon_particles", "n_ethane", "n_aggregates", "n_junk")
        dis = dataclasses.replace(dis, **{c: int(math.ceil(getattr(dis, c) * f)) for c in counts})
    return syn.make_micrograph_with_contrast(
        shape,
        APIX,
        CTF,
        dose_total=DOSE,
        contrast=contrast,
        rng=np.random.default_rng(seed),
        diameter_A=DIAM_A,
        n_particles=n,
        distractors=dis,
    )


def truth_xy(truth: syn.SpecimenTruth) -> np.ndarray:
    return np.array([[p.x, p.y] for p in truth.particles]).reshape(-1, 2)


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


# --------------------------------------------------------------------------- comparisons


def blob_dog_picks(image: np.ndarray) -> Callable[[float], np.ndarray]:
    """blob_dog on the picker's binned, inverted, standardised image, per threshold: (x, y)."""
    from skimage.feature import blob_dog

    b = SETTINGS.binning()
    binned = -_bin_image(image, b)
    binned = (binned - binned.mean()) / binned.std()
    r = SETTINGS.radius_px / b
    half = (b - 1) / 2.0

    def at(threshold: float) -> np.ndarray:
        blobs = blob_dog(
            binned,
            min_sigma=0.5 * r / math.sqrt(2),
            max_sigma=1.5 * r / math.sqrt(2),
            threshold=threshold,
            overlap=0.5,
        )
        return np.column_stack([blobs[:, 1] * b + half, blobs[:, 0] * b + half]).reshape(-1, 2)

    return at


def best_blob_dog(image: np.ndarray, xy: np.ndarray) -> tuple[MatchResult, float, float]:
    """blob_dog's best F1 over BLOB_THRESHOLDS (hindsight), its threshold and seconds per run."""
    at = blob_dog_picks(image)
    t0 = time.perf_counter()
    results = [(match_picks(at(t), xy, TOL_PX), t) for t in BLOB_THRESHOLDS]
    seconds = (time.perf_counter() - t0) / len(BLOB_THRESHOLDS)
    m, t = max(results, key=lambda mt: mt[0].f1)
    return m, t, seconds


def fractions_of_mean(clean: np.ndarray, truth: syn.SpecimenTruth) -> tuple[float, float]:
    """The two usual ways to state contrast, as fractions of the mean intensity, from the
    noise-free fractional contrast image: the particles' mean darkening at their centres, and
    the specimen image's std."""
    std = float(clean.std())
    return syn.particle_contrast(clean, truth) * std, std


def matched_filter_f1(image: np.ndarray, xy: np.ndarray) -> float:
    """F1 of the exact CTF-filtered particle as a template, at its hindsight threshold."""
    size = int(2 ** math.ceil(math.log2(2.5 * DIAM_A / APIX)))
    one = np.zeros((size, size), np.float32)
    syn._add_sphere(one, size / 2, size / 2, DIAM_A / APIX / 2, 1.0)
    template = syn.apply_ctf(ndimage.gaussian_filter(one, 1.0), APIX, CTF)
    kernel = np.zeros(image.shape, np.float32)
    h = size // 2
    t = np.fft.ifftshift(template)
    for sy in (slice(0, h), slice(-h, None)):
        for sx in (slice(0, h), slice(-h, None)):
            kernel[sy, sx] = t[sy, sx]
    img = image - image.mean()
    cc = np.fft.irfft2(np.fft.rfft2(img) * np.conj(np.fft.rfft2(kernel)), s=image.shape)
    cc /= cc.std()
    peak = cc == ndimage.maximum_filter(cc, size=int(DIAM_A / APIX / 2))
    ys, xs = np.nonzero(peak)
    v = cc[ys, xs]
    return max(
        match_picks(np.column_stack([xs[v > th], ys[v > th]]), xy, TOL_PX).f1
        for th in np.arange(1.0, 8.0, 0.125)
    )


# --------------------------------------------------------------------------- the command


def command_seconds(image: np.ndarray, workdir: Path) -> float:
    """Seconds in main() (MRC read, pick, STAR/text/preview writes), imports done before."""
    mic = workdir / "mic.mrc"
    write_mrc(mic, image, pixel_size_A=APIX)
    probe = (
        "import sys, time\n"
        "import pandas, starfile, PIL.Image, PIL.ImageDraw, scipy.ndimage, scipy.fft\n"
        "from cryoflow.processing.engines.dogpicker import main\n"
        "t = time.perf_counter(); rc = main(sys.argv[1:]); dt = time.perf_counter() - t\n"
        "print('BENCH', dt, file=sys.stderr); sys.exit(rc)\n"
    )
    argv = [sys.executable, "-c", probe, "-i", str(mic), "-o", str(workdir / "p.txt")]
    argv += ["--star", str(workdir / "p.star"), "--preview", str(workdir / "p.jpg")]
    argv += ["-d", str(DIAM_A), "--invert"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins")}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("BENCH"))
    return float(line.split()[1])


def start_seconds(args: list[str], repeats: int = 5) -> float:
    """Median seconds for the installed console script to run with ``args`` and exit."""
    exe = Path(sys.executable).with_name("cryoflow-dogpicker")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([str(exe), *args], capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- main


def fmt(m: MatchResult) -> str:
    return f"{m.precision:5.3f} {m.recall:5.3f} {m.f1:5.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2048x2048 micrographs, no K3")
    args = parser.parse_args()
    try:
        import skimage
    except ImportError:
        print("scikit-image is needed for the comparison (the bench extra)", file=sys.stderr)
        return 2
    shape = (2048, 2048) if args.quick else CAMERAS["Falcon"]
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__},"
        f" scikit-image {skimage.__version__}; {os.cpu_count()} CPUs; {platform.machine()}"
    )
    print(
        f"particles {DIAM_A:.0f} A at {APIX} A/px, CTF {CTF.defocus1_A:.0f}/{CTF.defocus2_A:.0f}"
        f" A, {DOSE / APIX**2:.0f} e/A^2; {shape[1]}x{shape[0]} px, bin {SETTINGS.binning()}\n"
    )
    header = (
        f"{'category':<11}{'contrast':>9}{'dark %':>7}{'std %':>6}{'picks/true':>11}   "
        f"{'ours P R F1':<18}{'s':>6}"
        f"   {'blob_dog P R F1':<18}{'thr':>5}{'s':>6}{'matched F1':>11}"
    )
    print(header)
    print("-" * len(header))
    ours_all, theirs_all = [], []
    for i, name in enumerate(CATEGORIES):
        image, truth, clean = make(name, shape, 300 + i)
        xy = truth_xy(truth)
        picks = pick(image, SETTINGS)
        ours = match_picks(np.column_stack([picks.x, picks.y]), xy, TOL_PX)
        wall, _ = timed(lambda image=image: pick(image, SETTINGS), repeats=1)
        theirs, thr, t_blob = best_blob_dog(image, xy)
        oracle = f"{matched_filter_f1(image, xy):11.3f}" if name.startswith("low") else ""
        darkening, specimen_std = fractions_of_mean(clean, truth)
        if name not in ("low 2.5%", "low 2%") and not name.startswith("dark"):
            ours_all.append(ours.f1)
            theirs_all.append(theirs.f1)
        print(
            f"{name:<11}{syn.particle_contrast(image, truth):>9.3f}"
            f"{100 * darkening:>7.2f}{100 * specimen_std:>6.2f}{len(picks):>5}/{len(xy):<5}"
            f"   {fmt(ours):<18}{wall:>6.2f}   {fmt(theirs):<18}{thr:>5.2f}{t_blob:>6.2f}{oracle}",
            flush=True,
        )
    print(
        f"\nmean F1 (all but 'low 2.5%', 'low 2%' and 'dark'): "
        f"ours {statistics.mean(ours_all):.3f}, "
        f"blob_dog {statistics.mean(theirs_all):.3f} (its threshold chosen per micrograph)"
    )

    print("\nspeed (pick: median of 3; CPU: this process's CPU seconds, all threads)")
    cams = {"Falcon": shape} if args.quick else CAMERAS
    for cam, cam_shape in cams.items():
        image, _, _ = make("mix", cam_shape, 400)
        pick(image, SETTINGS)  # warm
        wall, cpu = timed(lambda image=image: pick(image, SETTINGS))
        with tempfile.TemporaryDirectory() as tmp:
            cmd = command_seconds(image, Path(tmp))
        print(
            f"  {cam} {cam_shape[1]}x{cam_shape[0]} mix: pick {wall:.2f} s wall, {cpu:.2f} s CPU;"
            f" command (read, pick, write STAR/txt/preview) {cmd:.2f} s"
        )
    with tempfile.TemporaryDirectory() as tmp:
        missing = str(Path(tmp) / "missing.mrc")
        t_help = start_seconds(["--help"])
        t_first = start_seconds(["-i", missing, "-d", str(DIAM_A)])
    bare = statistics.median(
        timed(lambda: subprocess.run([sys.executable, "-c", "import numpy"], check=True))
    )
    print(
        f"  command start: --help {t_help:.2f} s; to the first read (a missing file) "
        f"{t_first:.2f} s; python + numpy alone {bare:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
