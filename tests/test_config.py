"""Configuration: the shipped files load, and every mistake names its file, key and value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cryoflow.config import (
    ConfigError,
    PermissionsConfig,
    config_dir,
    expand_env,
    load_facility,
    load_site,
)
from cryoflow.processing.compute.jobscript import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE

SHIPPED = Path(__file__).resolve().parents[1] / "config"


def _copy_config(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    shutil.copytree(SHIPPED, target)
    return target


def test_shipped_config_loads_with_two_microscopes() -> None:
    site = load_site(SHIPPED)
    assert set(site.microscopes) >= {"krios1", "krios2"}
    k1, k2 = site.microscopes["krios1"], site.microscopes["krios2"]
    assert (k1.layout, k1.detector.movie_format) == ("epu", "eer")
    assert (k2.layout, k2.detector.movie_format) == ("serialem", "tiff")
    assert site.facility.permissions.dir_mode == 0o2770
    assert site.facility.software["motioncor2"].backend in site.facility.compute


def test_environment_overrides_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CRYOFLOW_GPFS_ROOT", str(tmp_path))
    monkeypatch.delenv("CRYOFLOW_SHARE_ROOT", raising=False)
    site = load_site(SHIPPED)
    assert site.facility.storage.gpfs_root == tmp_path
    assert str(site.microscopes["krios1"].share.path) == "/mnt/microscopes/krios1"
    monkeypatch.setenv(  # a missing variable without default is named
        "X_UNUSED", "1"
    )
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        expand_env({"a": ["${NOPE_NOT_SET}"]})


def test_config_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CRYOFLOW_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "microscopes/krios1.yaml",
            "pixel_size_A: 0.73",
            "pixel_size_A: -1",
            r"krios1\.yaml.*detector\.pixel_size_A.*greater than 0\.1.*-1",
        ),
        (
            "microscopes/krios1.yaml",
            "layout: epu",
            "layout: leginon",
            r"krios1\.yaml.*layout.*'leginon'",
        ),
        (
            "microscopes/krios2.yaml",
            "  exclude:",
            "  exclud:",
            r"krios2\.yaml.*share\.exclud.*[Ee]xtra",
        ),
        (
            "microscopes/krios2.yaml",
            "id: krios2",
            "id: krios9",
            r"krios2\.yaml.*id.*'krios9'.*file name",
        ),
        (
            "facility.yaml",
            'dir_mode: "2770"',
            'dir_mode: "2777"',
            r"facility\.yaml.*permissions\.dir_mode.*world",
        ),
        (
            "facility.yaml",
            "backend: ${CRYOFLOW_GPU_BACKEND:-gpu-cluster}",
            "backend: nowhere",
            r"facility\.yaml.*software\.motioncor2\.backend.*'nowhere'",
        ),
        ("facility.yaml", "name: SLAC", "name: [SLAC", r"facility\.yaml.*not valid YAML"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, file: str, old: str, new: str, expected: str) -> None:
    cfg = _copy_config(tmp_path)
    path = cfg / file
    text = path.read_text()
    assert old in text, f"fixture drift: {old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=f"(?s){expected}"):
        load_site(cfg)


def test_duplicate_and_missing_microscopes(tmp_path: Path) -> None:
    cfg = _copy_config(tmp_path)
    for f in (cfg / "microscopes").glob("*.yaml"):
        f.unlink()
    with pytest.raises(ConfigError, match="no microscope files"):
        load_site(cfg)
    with pytest.raises(ConfigError, match="facility.yaml: cannot read"):
        load_site(tmp_path / "nowhere")


# --------------------------------------------------------------------------- permission modes


def _facility_with(tmp_path: Path, permissions: str) -> Path:
    """The shipped facility file with its ``permissions`` block replaced by ``permissions``."""
    text = (SHIPPED / "facility.yaml").read_text()
    start = text.index("permissions:\n")
    end = text.index("\n\n", start)
    path = tmp_path / "facility.yaml"
    path.write_text(text[:start] + "permissions:\n" + permissions + text[end:])
    return path


@pytest.mark.parametrize(
    ("dir_mode", "file_mode"),
    [
        ("2770", "640"),  # YAML integers, which YAML 1.1 reads as decimal 2770 and 640
        ('"2770"', '"0640"'),
        ("02770", "0640"),  # YAML 1.1 octal: the ints 1528 and 416
        ('"02770"', "'640'"),
        ('"0o2770"', '"0o640"'),
        ("0o2770", "0o640"),  # YAML 1.1 strings
        ('" 2770 "', "0o0640"),
    ],
)
def test_a_mode_means_octal_however_it_is_spelled(
    tmp_path: Path, dir_mode: str, file_mode: str
) -> None:
    path = _facility_with(tmp_path, f"  dir_mode: {dir_mode}\n  file_mode: {file_mode}\n")
    permissions = load_facility(path).permissions
    assert (permissions.dir_mode, permissions.file_mode) == (0o2770, 0o640)
    assert type(permissions.dir_mode) is int


def test_mode_from_the_environment_and_other_integers_are_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CF_TEST_DIR_MODE", "2750")
    path = _facility_with(tmp_path, "  dir_mode: ${CF_TEST_DIR_MODE}\n")
    facility = load_facility(path)
    assert facility.permissions.dir_mode == 0o2750
    assert facility.permissions.file_mode == DEFAULT_FILE_MODE == 0o640
    assert (facility.transfer.chunk_mib, type(facility.transfer.chunk_mib)) == (8, int)
    assert facility.processing.batch_max_movies == 200  # decimal, as written


def test_modes_given_from_python_are_taken_as_they_are() -> None:
    assert PermissionsConfig(file_mode=0o600, dir_mode=0o2700).file_mode == 0o600
    assert PermissionsConfig().dir_mode == DEFAULT_DIR_MODE == 0o2770
    with pytest.raises(ValueError, match=r"0o5322 grants world access \(o\+w\)"):
        PermissionsConfig(dir_mode=2770)  # decimal 2770 is 0o5322


@pytest.mark.parametrize(
    ("permissions", "expected"),
    [
        ("  dir_mode: 2777\n", "permissions.dir_mode: 2777 (as written) grants world access"),
        ('  dir_mode: "2775"\n', "permissions.dir_mode: 2775 (as written) grants world access"),
        ("  dir_mode: 02771\n", "permissions.dir_mode: 02771 (as written) grants world access"),
        ("  file_mode: 0644\n", "permissions.file_mode: 0644 (as written) grants world access"),
        ("  file_mode: 642\n", "permissions.file_mode: 642 (as written) grants world access"),
        ("  file_mode: 0o240\n", "permissions.file_mode: 0o240 (as written) denies the owner"),
        ("  file_mode: 240\n", "permissions.file_mode: 240 (as written) denies the owner read"),
        ("  dir_mode: 2670\n", "permissions.dir_mode: 2670 (as written) denies the owner"),
        ("  dir_mode: 2790\n", "permissions.dir_mode: 2790 (as written) is not an octal mode"),
        ("  dir_mode: 0x5c8\n", "permissions.dir_mode: 0x5c8 (as written) is not an octal"),
        ("  dir_mode: rwxrws---\n", "permissions.dir_mode: rwxrws--- (as written) is not an"),
        ("  dir_mode: 12770\n", "permissions.dir_mode: 12770 (as written) is out of range"),
    ],
)
def test_a_refused_mode_is_named_with_its_key_and_shown_as_written(
    tmp_path: Path, permissions: str, expected: str
) -> None:
    path = _facility_with(tmp_path, permissions)
    with pytest.raises(ConfigError) as info:
        load_facility(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 1 invalid setting(s)")
    assert expected in message
    assert "given:" not in message and "Value error" not in message  # said once, as written
