"""Facility and microscope configuration: YAML files in ``config/``, validated on load.

Why pydantic models here: a mistyped key in a microscope file must stop the DAG processor with an
error that names the file, the key and what is wrong, not surface hours later inside a task.
String values may refer to the environment as ``${VAR}`` or ``${VAR:-default}`` so one shipped
configuration serves the production stack (Docker secrets/env) and the embedded demo alike.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cryoflow.archive.settings import ArchiveConfig, CleanupConfig
from cryoflow.ingest.share.layout import Layout
from cryoflow.processing.compute.jobscript import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE
from cryoflow.processing.compute.settings import ComputeBackend

CONFIG_DIR_ENV = "CRYOFLOW_CONFIG_DIR"
FACILITY_FILE = "facility.yaml"
MICROSCOPES_DIR = "microscopes"

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SAFE_ID = r"^[a-z][a-z0-9_]{0,39}$"


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names file and key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- facility


class StorageConfig(_Model):
    gpfs_root: Path = Field(
        description="Long-term storage root; sessions go to <root>/<year>/<session>."
    )
    ledger_url: str = Field(description="SQLAlchemy URL of the session ledger database.")


class PermissionsConfig(_Model):
    dir_mode: int = Field(
        DEFAULT_DIR_MODE, description="Session folders and all below: setgid, group rwx, no world."
    )
    file_mode: int = Field(
        DEFAULT_FILE_MODE, description="Copied and processed files: owner rw, group r, no world."
    )
    acl: Literal["auto", "off", "required"] = Field(
        "auto", description="Collaborator ACLs: 'auto' applies them where the filesystem can."
    )

    @field_validator("dir_mode", "file_mode", mode="before")
    @classmethod
    def _mode(cls, value: Any, info: ValidationInfo) -> int:
        return parse_mode(value, folder=info.field_name == "dir_mode")


#: Error type of a refused mode: its message already shows the value as written.
MODE_ERROR = "permission_mode"
_NEED = {True: (0o700, "read, write and search"), False: (0o400, "read")}


def parse_mode(value: Any, *, folder: bool) -> int:
    """A permission mode from config: always octal, however the YAML spelled it.

    ``2770``, ``"2770"``, ``02770``, ``"0o2770"`` and ``0o2770`` all mean ``0o2770``: text
    (strings, and integers as written in the file, see :class:`_SourceInt`) is read as octal.
    A plain ``int`` passed from Python (``0o640``) is taken as it is. Refused: a mode that
    grants the world anything, or denies the owner (the service account) what it needs: read
    for files; read, write and search for folders it fills.
    """
    if isinstance(value, _SourceInt | str):
        written = value.text if isinstance(value, _SourceInt) else value.strip()
        shown = f"{written or repr(value)} (as written)"
        try:
            mode = int(written, 8)
        except ValueError:
            raise _mode_error("{shown} is not an octal mode such as 2770 or 0640", shown) from None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode, shown = value, oct(value)
    else:
        raise _mode_error("{shown} is not an octal mode such as 2770 or 0640", repr(value))
    if not 0 <= mode <= 0o7777:
        raise _mode_error("{shown} is out of range for a mode (0 to 7777)", shown)
    if mode & 0o007:
        world = "".join(c for bit, c in ((4, "r"), (2, "w"), (1, "x")) if mode & bit)
        raise _mode_error(
            "{shown} grants world access (o+{world}); experiment data must not",
            shown,
            world=world,
        )
    need, what = _NEED[folder]
    if mode & need != need:
        kind = "folders" if folder else "files"
        raise _mode_error(
            "{shown} denies the owner {what}; the pipeline could not use its own {kind}",
            shown,
            what=what,
            kind=kind,
        )
    return mode


def _mode_error(template: str, shown: str, **context: str) -> PydanticCustomError:
    return PydanticCustomError(MODE_ERROR, template, {"shown": shown, **context})


class TransferConfig(_Model):
    chunk_mib: int = Field(8, ge=1, le=256, description="Copy buffer size.")
    settle_seconds: float = Field(
        30.0, gt=0, description="A file is complete once size and mtime stayed unchanged this long."
    )
    whole_settle_seconds: float | None = Field(
        2.0,
        gt=0,
        description="A file whose format proves it finished (a movie with the session's "
        "frame count, an EER with the frames its metadata promises, well-formed XML) is ready "
        "after this long unchanged instead of settle_seconds; null: every file settles.",
    )
    poll_seconds: float = Field(10.0, gt=0, description="Share scan interval.")
    batch_max_files: int = Field(200, ge=1, le=1024, description="Most files in one batch run.")
    batch_window_seconds: float = Field(
        60.0, ge=0, description="Wait this long after the first ready file to fill a batch."
    )
    streams: int = Field(4, ge=1, le=64, description="Files copied in parallel within a batch.")
    incomplete_after_seconds: float = Field(
        600.0,
        gt=0,
        description="A file still incomplete (by its format) after this long unchanged is "
        "reported incomplete: its writer stopped for good.",
    )
    short_after_seconds: float = Field(
        30.0,
        gt=0,
        description="A movie whole by its format but with fewer frames than expected is "
        "copied after this long unchanged (the form's frame count was wrong).",
    )
    retry_seconds: float = Field(
        10.0, gt=0, description="First wait before a failed copy is tried again (doubles)."
    )
    retry_max_seconds: float = Field(
        300.0, gt=0, description="Longest wait between two tries of a failed copy."
    )
    max_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description="Tries of a copy that failed for a reason other than a transient fault "
        "(those never give up) before it waits for a person.",
    )


class ProcessingConfig(_Model):
    batch_max_movies: int = Field(
        200, ge=1, le=5000, description="Most movies one processing run takes per step."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Tries per movie and step before it waits for a person."
    )
    claim_grace_seconds: float = Field(
        600.0, gt=0, description="A claim this old whose job ended was left by a dead run."
    )
    hold_worker_seconds: float = Field(
        10.0,
        ge=0,
        le=60,
        description="Before deferring, a run follows its arrays from the worker this long "
        "(short arrays end without a deferral and its restart).",
    )
    linger_seconds: float = Field(
        0.0,
        ge=0,
        description="A run with nothing left to follow waits this long for newly owed movies "
        "before it ends (one run takes a session's batches one after the other: fewer task "
        "instances); 0: it ends at once.",
    )
    takes_new_work_minutes: float = Field(
        30.0,
        gt=0,
        description="A run stops taking newly owed movies after this long and ends when its "
        "jobs end (the next run takes over): bounded task logs.",
    )


class SoftwareStep(_Model):
    binary: str = Field(description="Executable on the compute nodes (or a built-in engine).")
    backend: str = Field(description="Name of a compute backend in 'compute'.")
    modules: list[str] = Field(default_factory=list, description="`module load` lines.")
    version: str | None = None


class FacilityConfig(_Model):
    name: str
    storage: StorageConfig
    permissions: PermissionsConfig = PermissionsConfig()
    transfer: TransferConfig = TransferConfig()
    processing: ProcessingConfig = ProcessingConfig()
    archive: ArchiveConfig = ArchiveConfig()
    compute: dict[str, ComputeBackend] = Field(default_factory=dict)
    software: dict[Literal["motioncor2", "ctffind", "dogpicker"], SoftwareStep] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _backends_exist(self) -> FacilityConfig:
        for step, cfg in self.software.items():
            if cfg.backend not in self.compute:
                known = ", ".join(sorted(self.compute)) or "none defined"
                raise ValueError(
                    f"software.{step}.backend: unknown compute backend {cfg.backend!r} ({known})"
                )
        return self


# --------------------------------------------------------------------------- microscope


class ShareConfig(_Model):
    kind: Literal["cifs", "smb"] = Field(
        "cifs",
        description="'cifs': a mounted share read as a local path; 'smb': the microscope PC "
        "spoken to directly over SMB 2/3 (server, share_name, conn_id).",
    )
    path: Path = Field(
        description="cifs: the mounted folder; smb: the folder within the share ('.' = its top)."
    )
    exclude: list[str] = Field(default_factory=list, description="Extra glob patterns to ignore.")
    settle_seconds: float | None = Field(
        None, gt=0, description="Overrides transfer.settle_seconds."
    )
    server: str | None = Field(None, description="smb: host name or address of the PC.")
    port: int = Field(445, ge=1, le=65535, description="smb: TCP port.")
    share_name: str | None = Field(None, description="smb: the share's name on the PC.")
    conn_id: str | None = Field(
        None, description="smb: Airflow Connection holding login and password (never the YAML)."
    )

    @model_validator(mode="after")
    def _smb_fields(self) -> ShareConfig:
        smb = {"server": self.server, "share_name": self.share_name, "conn_id": self.conn_id}
        if self.kind == "smb":
            missing = [k for k, v in smb.items() if not v]
            if missing:
                raise ValueError(f"kind smb needs {', '.join(missing)}")
            if self.path.is_absolute() or ".." in self.path.parts:
                raise ValueError(f"path: {self.path} must be a folder within the share")
        elif given := [k for k, v in smb.items() if v]:
            raise ValueError(f"{', '.join(given)}: only for kind smb")
        return self


class DetectorConfig(_Model):
    name: str
    movie_format: Literal["tiff", "eer", "mrc"]
    pixel_size_A: float = Field(gt=0.1, lt=20)
    super_resolution: bool = False
    frames: int = Field(40, ge=1, le=2000, description="Frames (or EER fractions) per movie.")
    dose_per_frame: float = Field(1.0, gt=0, lt=50, description="e/Å² per frame.")
    gain_reference: str | None = Field(
        None, description="Gain reference file name (glob) within the session folder."
    )


class OpticsConfig(_Model):
    kv: float = Field(300.0, ge=60, le=400)
    cs_mm: float = Field(2.7, ge=0, le=10)
    amp_contrast: float = Field(0.07, ge=0, lt=1)


class ProcessingDefaults(_Model):
    motioncor: bool = True
    ctf: bool = True
    picking: bool = True
    particle_diameter_A: float = Field(150.0, gt=10, lt=2000)


class SessionDefaults(_Model):
    idle_timeout_minutes: float = Field(
        60.0, gt=0, description="End the session after this long without a new file."
    )
    max_hours: float = Field(96.0, gt=0, description="Hard end of a session.")


def _threshold(default: float, description: str, *aliases: str, **bounds: Any) -> Any:
    return Field(
        default, description=description, validation_alias=AliasChoices(*aliases), **bounds
    )


class CurationThresholds(_Model):
    """Per-movie acceptance limits (the one definition: the session form, the verdicts and the
    session view's lines all use these names and defaults). Units are the view's: Å, µm of
    defocus, particles per micrograph. The YAML may also spell them max_drift_A,
    max_ctf_resolution_A, defocus_min_um, defocus_max_um."""

    max_total_drift_A: float = _threshold(
        30.0, "Total drift above this blurs beyond what MotionCor2 fixes.",
        "max_total_drift_A", "max_drift_A", gt=0,
    )  # fmt: skip
    min_defocus_um: float = _threshold(
        0.5, "Closer to focus: little low-resolution contrast.",
        "min_defocus_um", "defocus_min_um", ge=0,
    )  # fmt: skip
    max_defocus_um: float = _threshold(
        3.0, "Further: the CTF envelope kills high resolution.",
        "max_defocus_um", "defocus_max_um", gt=0,
    )  # fmt: skip
    max_astigmatism_A: float = _threshold(
        1000.0, "|defocus1 - defocus2| above this.", "max_astigmatism_A", gt=0
    )
    max_fit_resolution_A: float = _threshold(
        6.0, "Worst CTFFIND fit resolution accepted (thick ice, drift, no Thon rings).",
        "max_fit_resolution_A", "max_ctf_resolution_A", gt=0,
    )  # fmt: skip
    min_particles: float = _threshold(
        20.0, "Fewer picks: empty hole, thick ice or carbon.", "min_particles", ge=0
    )

    @model_validator(mode="after")
    def _defocus_range(self) -> CurationThresholds:
        if self.min_defocus_um >= self.max_defocus_um:
            raise ValueError(
                f"min_defocus_um ({self.min_defocus_um:g}) must be below max_defocus_um "
                f"({self.max_defocus_um:g})"
            )
        return self


class NotifierConfig(_Model):
    kind: Literal["smtp", "slack"] = Field(
        "smtp", description="smtp: apache-airflow-providers-smtp; slack: ...-providers-slack."
    )
    conn_id: str = Field(
        description="Airflow connection: an SMTP server, or a Slack webhook (its channel)."
    )
    to: list[str] = Field(default_factory=list, description="Mail recipients (smtp).")
    from_email: str | None = Field(None, description="Sender (smtp); else the connection's.")

    @model_validator(mode="after")
    def _recipients(self) -> NotifierConfig:
        if self.kind == "smtp" and not self.to:
            raise ValueError("to: an smtp notifier needs at least one recipient")
        return self


class CurationAlert(_Model):
    window: int = Field(25, ge=1, le=10000, description="The last N decided movies.")
    min_accepted_fraction: float = Field(
        0.5, ge=0, le=1, description="Alert when fewer of the window's movies were accepted."
    )
    no_movie_minutes: float = Field(
        15.0, gt=0, description="Alert when a running session had no new movie this long."
    )
    notifier: NotifierConfig | None = Field(
        None, description="Where alerts go; none: shown in the session view only."
    )


class CurationConfig(CurationThresholds):
    """``curation:`` of a microscope file: the thresholds (the session form's defaults) and the
    rolling-window alert."""

    alert: CurationAlert = CurationAlert()

    @property
    def thresholds(self) -> CurationThresholds:
        return CurationThresholds(**{k: getattr(self, k) for k in CurationThresholds.model_fields})


class MicroscopeConfig(_Model):
    id: Annotated[str, Field(pattern=SAFE_ID, description="Short id; the DAG is session_<id>.")]
    name: str
    description: str = ""
    layout: Layout
    share: ShareConfig
    detector: DetectorConfig
    optics: OpticsConfig = OpticsConfig()
    processing: ProcessingDefaults = ProcessingDefaults()
    session: SessionDefaults = SessionDefaults()
    cleanup: CleanupConfig = CleanupConfig()
    curation: CurationConfig = CurationConfig()
    tags: list[str] = Field(default_factory=list)


def share_queue(scope: MicroscopeConfig) -> str:
    """The Celery (and triggerer) queue of the tasks that touch a microscope's share: served
    only by workers on nodes that mount it (docker-compose.yml, docs/deployment.md)."""
    return f"microscope-{scope.id}"


class SiteConfig(_Model):
    """Everything loaded from one config directory."""

    facility: FacilityConfig
    microscopes: dict[str, MicroscopeConfig]


# --------------------------------------------------------------------------- loading


def expand_env(value: Any, *, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a loaded YAML tree."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set and has no default")

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: expand_env(v, where=f"{where}.{k}" if where else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    return value


class _SourceInt(int):
    """A YAML integer that remembers how it was written.

    YAML 1.1 reads ``2770`` as decimal and ``02770`` as octal, so the number alone cannot tell
    what a person meant by a mode; :func:`parse_mode` reads ``text`` instead. Everywhere else it
    is the plain int (pydantic turns it into one).
    """

    text: str

    def __new__(cls, value: int, text: str) -> _SourceInt:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __getnewargs__(self) -> tuple[int, str]:  # copy/pickle keep the text
        return int(self), self.text


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that integers keep their source text."""


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> _SourceInt:
    return _SourceInt(loader.construct_yaml_int(node), node.value)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return expand_env(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _format_validation(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} invalid setting(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        given = err.get("input")
        shown = (
            ""
            if isinstance(given, dict | list) or given is None or err["type"] == MODE_ERROR
            else f" (given: {given!r})"
        )
        lines.append(f"  {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def _validate(model: type[_Model], path: Path, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from None


def load_facility(path: Path) -> FacilityConfig:
    """Load and validate the facility file."""
    return _validate(FacilityConfig, path, _read_yaml(path))


def load_microscope(path: Path) -> MicroscopeConfig:
    """Load and validate one microscope file; its ``id`` must match the file name."""
    scope = _validate(MicroscopeConfig, path, _read_yaml(path))
    if scope.id != path.stem:
        raise ConfigError(f"{path}: id: {scope.id!r} must equal the file name {path.stem!r}")
    return scope


def config_dir() -> Path:
    """The configuration directory: ``$CRYOFLOW_CONFIG_DIR`` or the bundle's own ``config/``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "config"


def load_site(directory: Path | None = None) -> SiteConfig:
    """Load the facility file and every ``microscopes/*.yaml`` of a config directory."""
    directory = directory or config_dir()
    facility = load_facility(directory / FACILITY_FILE)
    scopes_dir = directory / MICROSCOPES_DIR
    files = sorted(scopes_dir.glob("*.yaml")) + sorted(scopes_dir.glob("*.yml"))
    if not files:
        raise ConfigError(f"{scopes_dir}: no microscope files (*.yaml)")
    microscopes: dict[str, MicroscopeConfig] = {}
    for path in files:
        scope = load_microscope(path)
        if scope.id in microscopes:
            raise ConfigError(f"{path}: id: {scope.id!r} is already used by another microscope")
        microscopes[scope.id] = scope
    return SiteConfig(facility=facility, microscopes=microscopes)
