"""Configuration: the shipped files load, and every mistake names its file, key and value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cryoflow.config import ConfigError, config_dir, expand_env, load_site

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
