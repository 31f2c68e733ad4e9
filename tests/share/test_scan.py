"""Share scanning: what is ignored, what is refused, and when a file counts as finished."""

from __future__ import annotations

import fnmatch
import json
import os
import random
from pathlib import Path, PurePosixPath

import pytest

from cryoflow.ingest.share.scan import (
    IGNORED_NAMES,
    IGNORED_PATTERNS,
    FileStat,
    Observation,
    PathResolver,
    StabilityTracker,
    UnsafePathError,
    is_ignored,
    resolve_in,
    safe_relpath,
    scan_tree,
)
from tests.share.conftest import Backend


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_scan_lists_files_and_prunes_windows_and_hidden_entries(share_backend: Backend) -> None:
    """The same on a mounted folder and over SMB (where mtimes have microsecond precision)."""
    tmp_path = share_backend.root
    keep = [
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010_fractions.tiff",
        "Images-Disc1/GridSquare_1/Data/FoilHole_2_Data_3_4_20261124_101010.xml",
        "odd names/[grid 2] ü $(x) `y`.tif",
    ]
    skip = [
        "$RECYCLE.BIN/S-1-5/old.tif",
        "System Volume Information/tracking.log",
        ".hidden/movie.tif",
        "Images-Disc1/.~lock.tiff",
        "movie.tif.downloading",
        "Thumbs.db",
        "thumbs/a.jpg",
    ]
    for rel in keep + skip:
        _touch(tmp_path, rel)
    result = share_backend.source.scan(exclude=["*.jpg"])
    assert sorted(result.files) == sorted(keep)
    mtime_ns = (tmp_path / keep[0]).stat().st_mtime_ns
    if share_backend.kind == "smb":
        mtime_ns = mtime_ns // 1000 * 1000
    assert result.files[keep[0]] == FileStat(1, mtime_ns)
    if share_backend.kind == "mount":
        assert scan_tree(tmp_path, exclude=["*.jpg"]) == result  # LocalSource is scan_tree


def test_symlinks_out_of_the_share_are_refused(tmp_path: Path) -> None:
    share, outside = tmp_path / "share", tmp_path / "secret"
    share.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root")
    os.symlink(outside / "passwd", share / "escape.tif")
    os.symlink(outside, share / "escape_dir")
    _touch(share, "real.tif")
    os.symlink(share / "real.tif", share / "alias.tif")
    result = scan_tree(share)
    assert set(result.files) == {"real.tif", "alias.tif"}
    assert sorted(result.refused) == ["escape.tif", "escape_dir"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../b", "a\\b", "a\x00b", ""])
def test_unsafe_relative_paths_are_rejected(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


@pytest.mark.parametrize("resolver", ["resolve_in", "PathResolver"])
def test_a_batch_resolves_like_resolve_in(tmp_path: Path, resolver: str) -> None:
    """A batch's resolver (each folder resolved once) refuses what resolve_in refuses: a folder
    or a file that is a symlink leading out of the share; links inside the share are fine."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "Data").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"x")
    (share / "Data" / "m1.tif").write_bytes(b"m")
    (share / "out").symlink_to(outside)  # a folder link out of the share
    (share / "Data" / "leak.tif").symlink_to(outside / "secret.tif")  # a file link out
    (share / "Data" / "alias.tif").symlink_to(share / "Data" / "m1.tif")  # a link inside
    resolve = PathResolver(share) if resolver == "PathResolver" else (
        lambda rel: resolve_in(share, rel))  # fmt: skip
    assert resolve("Data/m1.tif") == share / "Data" / "m1.tif"
    assert resolve("Data/alias.tif") == share / "Data" / "alias.tif"
    for rel in ("out/secret.tif", "Data/leak.tif", "Data/../../outside/secret.tif"):
        with pytest.raises(UnsafePathError):
            resolve(rel)
    assert resolve("Data/m1.tif") == share / "Data" / "m1.tif"  # the cached folder again


def test_resolve_in_refuses_symlinked_escape(tmp_path: Path) -> None:
    (tmp_path / "share").mkdir()
    os.symlink("/etc", tmp_path / "share" / "etc")
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_in(tmp_path / "share", "etc/passwd")
    assert resolve_in(tmp_path / "share", "x y/z.tif") == tmp_path / "share" / "x y" / "z.tif"


def test_ignore_rules() -> None:
    assert is_ignored("a/$RECYCLE.BIN/b")
    assert is_ignored("FoilHole_1_downloading_2.tiff")
    assert is_ignored("x/.partial")
    assert not is_ignored("GridSquare_1/Data/FoilHole_1_Data_2_fractions.tiff")
    assert is_ignored("a/b.jpg", ["*.jpg"])
    assert is_ignored("logs/run.log", ["logs/*"])


def test_file_is_ready_only_after_settling() -> None:
    tracker = StabilityTracker(settle_seconds=5.0)
    m = {"m.tif"}
    growing = {"m.tif": FileStat(100, 1)}
    assert tracker.observe(growing, now=0.0) == Observation(set(), m, m)
    growing = {"m.tif": FileStat(200, 2)}  # still being written
    assert tracker.observe(growing, now=4.0) == Observation(set(), m, m)
    assert tracker.observe(growing, now=8.0) == Observation(set(), m, set())  # 4 s unchanged
    assert tracker.observe(growing, now=9.0) == Observation(m, set(), set())
    # mtime touched without size change restarts the clock
    touched = {"m.tif": FileStat(200, 3)}
    assert tracker.observe(touched, now=10.0) == Observation(set(), m, m)
    # vanished files are forgotten
    assert tracker.observe({}, now=11.0) == Observation(set(), set(), set())
    assert tracker.stat_of("m.tif") is None


def _fnmatch_is_ignored(relpath: str, extra: tuple[str, ...] = ()) -> bool:
    """The original fnmatch-per-pattern rule, kept here as the reference the fast matcher obeys."""
    parts = PurePosixPath(relpath).parts
    if any(part.startswith(".") or part in IGNORED_NAMES for part in parts):
        return True
    name = parts[-1] if parts else relpath
    return any(
        fnmatch.fnmatchcase(name.lower(), p.lower()) or fnmatch.fnmatchcase(relpath, p)
        for p in (*IGNORED_PATTERNS, *extra)
    )


def test_fast_matcher_agrees_with_fnmatch() -> None:
    rng = random.Random(7)
    alphabet = "aAbB.~$_-/*?[]!Σσς\\"
    shapes = ["*", "**", "", "*.JPG", "logs/*", "a*b", "[ab]*", "*[", "~$*", "A?", "*a/b*", "x**"]
    for _ in range(3000):
        rel = "/".join(
            "".join(rng.choice(alphabet.replace("/", "")) for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 3))
        )
        rel = rel if rng.random() < 0.7 else rel.replace("a", "downloading", 1)
        extra = tuple(
            rng.choice(shapes) if rng.random() < 0.5 else "".join(rng.sample(alphabet, 3))
            for _ in range(rng.randint(0, 3))
        )
        if rng.random() < 0.2:  # whole-name and whole-path patterns, in either case
            extra += (rng.choice([rel, rel.upper(), rel.rsplit("/", 1)[-1].swapcase()]),)
        assert is_ignored(rel, extra) == _fnmatch_is_ignored(rel, extra), (rel, extra)


def test_excludes_fold_case_on_the_name_but_not_on_the_path() -> None:
    assert is_ignored("Images-Disc1/GS_1/a.JPG", ["*.jpg"])
    assert is_ignored("Images-Disc1/GS_1/a.jpg", ["*.JPG"])
    assert is_ignored("logs/run.log", ["logs/*"])
    assert not is_ignored("Logs/run.log", ["logs/*"])
    assert is_ignored("Logs/run.log", ["Logs/*"])


def test_scan_prunes_exactly_what_is_ignored_at_any_depth(tmp_path: Path) -> None:
    rng = random.Random(3)
    pieces = ["a", "B", ".h", "~$x", "y.TMP", "z.part", "DownLoading", "$RECYCLE.BIN", "keep"]
    created = set()
    for _ in range(300):
        rel = "/".join(
            rng.choice(pieces) + str(rng.randint(0, 2)) for _ in range(rng.randint(1, 4))
        )
        try:
            _touch(tmp_path, rel)
        except OSError:  # a file already sits where this path wants a folder, or the reverse
            continue
        created.add(rel)
    created = {rel for rel in created if (tmp_path / rel).is_file()}
    parts = {rel: rel.split("/") for rel in created}
    # every shape the walk matches on the name alone (x, x*, *x, *x*) and those it must also
    # match on the path (a /, ?, [), in either case
    for exclude in [
        ("keep1/*", "*2.TMP"),
        ("B1", "a2*", "*eep0", "*OWNL*", "KEEP2"),
        ("a0/*",),
        ("*1/k*",),
        ("?0/B*", "[ab]2/*"),
        ("a*1",),  # a * inside matches a / too
        ("*0*B*",),
        ("keep*",),
    ]:
        expected = {
            rel
            for rel in created
            if not any(
                _fnmatch_is_ignored("/".join(parts[rel][: i + 1]), exclude)
                for i in range(len(parts[rel]))
            )
        }
        assert len(expected) < len(created), exclude
        result = scan_tree(tmp_path, exclude)
        assert set(result.files) == expected, exclude
        assert not result.errors and not result.refused


def test_symlink_loops_and_links_to_folders(tmp_path: Path) -> None:
    _touch(tmp_path, "Data/movie.tif")
    os.symlink("self", tmp_path / "self")  # points at itself
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    os.symlink("Data", tmp_path / "Data_link")  # inside the share, but a folder: never walked
    os.symlink("missing.tif", tmp_path / "dangling.tif")
    result = scan_tree(tmp_path)
    assert set(result.files) == {"Data/movie.tif"}
    assert sorted(e.split(":")[0] for e in result.errors) == ["loop_a", "loop_b", "self"]
    assert result.refused == []


def test_undecodable_names_are_listed(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/Data/movie_\xff\xfe.tif"
    os.makedirs(os.fsencode(tmp_path) + b"/Data")
    with open(raw, "wb") as fh:
        fh.write(b"abc")
    name = "Data/" + os.fsdecode(b"movie_\xff\xfe.tif")
    result = scan_tree(tmp_path)
    assert list(result.files) == [name]
    assert result.files[name].size == 3
    assert resolve_in(tmp_path, name).stat().st_size == 3  # the key leads back to the file


def test_unreadable_or_vanishing_entries_are_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for rel in ("ok.tif", "gone.tif", "locked/movie.tif"):
        _touch(tmp_path, rel)
    real_open, real_scandir = os.open, os.scandir

    def open_folder(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if os.path.basename(path) == "locked":  # what a CIFS ACL does to root as well
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    def scandir(folder: int) -> object:
        entries = list(real_scandir(folder))
        (tmp_path / "gone.tif").unlink(missing_ok=True)  # deleted between listing and stat
        return iter(entries)

    monkeypatch.setattr(os, "open", open_folder)
    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_tree(tmp_path)
    assert set(result.files) == {"ok.tif"}
    assert sorted(result.errors) == [
        "gone.tif: No such file or directory",
        "locked: Permission denied",
    ]


def test_stability_survives_into_a_new_tracker() -> None:
    m = {"m.tif"}
    old = StabilityTracker(settle_seconds=1.0)
    files = {"m.tif": FileStat(100, 7)}
    old.observe(files, now=50.0)
    assert old.observe(files, now=50.8) == Observation(set(), m, set())
    state = json.loads(json.dumps(old.snapshot(now=50.8)))
    assert state["m.tif"][:2] == [100, 7] and state["m.tif"][2] == pytest.approx(0.8)

    # next batch run: another process, another monotonic origin
    new = StabilityTracker.restore(1.0, state, now=1000.0)
    assert new.stat_of("m.tif") == FileStat(100, 7)
    assert new.observe(files, now=1000.1) == Observation(set(), m, set())
    assert new.observe(files, now=1000.2) == Observation(m, set(), set())

    grown = {"m.tif": FileStat(200, 8)}
    again = StabilityTracker.restore(1.0, state, now=1000.0)
    assert again.observe(grown, now=1000.2) == Observation(set(), m, m)  # settle restarts
    assert again.observe(grown, now=1001.1) == Observation(set(), m, set())
    assert again.observe(grown, now=1001.2) == Observation(m, set(), set())


def test_restore_drops_malformed_entries() -> None:
    state = {
        "ok.tif": [1, 2, 0.5],
        "int_age.tif": [1, 2, 3],
        "short.tif": [1, 2],
        "text.tif": ["1", 2, 0.5],
        "bool.tif": [True, 2, 0.5],
        "negative.tif": [-1, 2, 0.5],
        "nan.tif": [1, 2, float("nan")],
        "future.tif": [1, 2, -5.0],
        "dict.tif": {"size": 1},
        7: [1, 2, 0.5],
    }
    tracker = StabilityTracker.restore(5.0, state, now=10.0)  # type: ignore[arg-type]
    assert tracker.snapshot(now=10.0) == {"ok.tif": [1, 2, 0.5], "int_age.tif": [1, 2, 3]}
    assert StabilityTracker.restore(5.0, None, now=0.0).snapshot(now=0.0) == {}
    assert StabilityTracker.restore(5.0, [], now=0.0).snapshot(now=0.0) == {}  # type: ignore[arg-type]


def test_names_that_lower_case_differently_in_context_are_matched_on_the_path(
    tmp_path: Path,
) -> None:
    # "AΣ".lower() is "aς" (final sigma) while "*Σ*".lower() is "*σ*": only the path match sees it
    _touch(tmp_path, "d/AΣ")
    _touch(tmp_path, "d/keep")
    assert is_ignored("d/AΣ", ["*Σ*"])
    assert set(scan_tree(tmp_path, ("*Σ*",)).files) == {"d/keep"}


def test_a_session_folder_that_is_a_link_is_listed(tmp_path: Path) -> None:
    _touch(tmp_path, "disk2/session/Data/movie.tif")
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "session").symlink_to(tmp_path / "disk2" / "session")
    result = scan_tree(tmp_path / "share" / "session")
    assert set(result.files) == {"Data/movie.tif"} and not result.errors
