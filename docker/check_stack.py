#!/usr/bin/env python3
"""Check the Swarm stack file without a Docker engine (CI runs it through tests/test_stack.py).

    python docker/check_stack.py [docker-compose.yml] [--env stack.env]

Prints each problem and exits 1 if there is one. The file is interpolated as `docker stack deploy`
does (${VAR}, ${VAR:-default}, ${VAR:?message}, $$) with the variables of --env (default
docker/stack.env.example) and then:

- validated against the Compose Specification's JSON schema (tests/data/compose-spec.json);
- every secret, config, network and volume a service names is defined at the top level, and
  every one defined there is used; secrets are external (made with `docker secret create`, never
  from a file or a variable); a config's relative file exists;
- every service has an image: ours (${CRYOFLOW_IMAGE}:${CRYOFLOW_TAG}, built by docker/Dockerfile)
  or another one pinned by a version tag (never latest, never a variable);
- no environment value holds a secret: a secret-like name must end in _CMD, _SECRET or _FILE,
  no URL carries a password, no connection JSON a password or key; each secret a *_CMD command,
  a *_FILE or a key_file reads is mounted into that service;
- every service has a healthcheck, or an x-healthcheck-exempt reason; a restart policy; long-
  running services update and roll back (update_config with failure_action: rollback);
- GPFS and share mounts: the same path inside as on the host, and the service placed on nodes
  labelled cryoflow.gpfs / cryoflow.share.<id>; a worker and a triggerer for each microscope's
  queue (microscope-<id>, for each config/microscopes/*.yaml) and for "default", each mounting
  what its queue's tasks touch;
- a variable used with a default has the same default everywhere.

Needs PyYAML and jsonschema (both come with Airflow).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
EXAMPLE_ENV = ROOT / "docker" / "stack.env.example"
MICROSCOPES = ROOT / "config" / "microscopes"

OUR_IMAGE = re.compile(r"^\$\{CRYOFLOW_IMAGE[:?}].*:\$\{CRYOFLOW_TAG[:?}]")
PINNED_IMAGE = re.compile(
    r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?(@sha256:[0-9a-f]{64})?$"
)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|FERNET|PRIVATE|CREDENTIAL|API_KEY|JWT")
SAFE_SUFFIXES = ("_CMD", "_SECRET", "_FILE")
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)
SECRET_FILE = re.compile(r"/run/secrets/([A-Za-z0-9_.-]+)")
SECRET_CMD = "cryoflow-secret"
DB_SECRET = "db_password"
CONN_SECRET_KEYS = {"password", "private_key", "passphrase", "private_key_passphrase", "key"}
GPFS_VARS = ("CRYOFLOW_GPFS_ROOT", "CRYOFLOW_AIRFLOW_LOGS")
SHARE_VAR = "CRYOFLOW_SHARE_ROOT"
GPFS_LABEL = "node.labels.cryoflow.gpfs == true"
DEFAULT_QUEUE = "default"
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def share_label(scope: str) -> str:
    return f"node.labels.cryoflow.share.{scope} == true"


def scope_queue(scope: str) -> str:
    return f"microscope-{scope}"


# -- loading and interpolation --------------------------------------------------------------------


def load_stack(path: Path = STACK) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_schema(path: Path = SCHEMA) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as the stack.env files have them (comments, optional quotes)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def microscope_ids(directory: Path = MICROSCOPES) -> list[str]:
    ids = []
    for path in sorted(directory.glob("*.y*ml")):
        data = yaml.safe_load(path.read_text()) or {}
        ids.append(str(data.get("id", path.stem)))
    return ids


def _substitute(text: str, env: dict[str, str], where: str, problems: list[str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return env.get(match.group("plain"), "")
        expr = match.group("braced") or ""
        found = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?+])(.*))?$", expr, re.DOTALL)
        if not found:
            problems.append(f"interpolation: {where}: bad expression ${{{expr}}}")
            return ""
        name, colon, op, arg = found.groups()
        value = env.get(name)
        unset = value is None or (colon == ":" and value == "")
        if op == "-":
            return arg if unset else value  # type: ignore[return-value]
        if op == "?":
            if unset:
                problems.append(f"interpolation: {where}: {name} is required ({arg})")
                return ""
            return value  # type: ignore[return-value]
        if op == "+":
            return "" if unset else arg
        return value or ""

    return _VAR.sub(one, text)


def interpolate(stack: Any, env: dict[str, str]) -> tuple[Any, list[str]]:
    """The stack with every string value interpolated (keys are not), and the problems met."""
    problems: list[str] = []

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            return _substitute(node, env, where, problems)
        return node

    return walk(copy.deepcopy(stack), ""), problems


def variable_defaults(stack: Any) -> dict[str, set[str]]:
    """Each variable used with ${VAR:-default} and the defaults it is given."""
    found: dict[str, set[str]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            for name, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}", node):
                found.setdefault(name, set()).add(default)

    walk(stack)
    return found


# -- the checks -----------------------------------------------------------------------------------


def schema_problems(stack: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    # The spec names draft-07 as "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema does not recognise by that spelling.
    if "draft-07" in str(schema.get("$schema", "")):
        validator_class: Any = jsonschema.Draft7Validator
    else:
        validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema)
    out = []
    for error in sorted(validator.iter_errors(stack), key=lambda e: list(map(str, e.path))):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"schema: {where}: {error.message}")
    return out


def _services(stack: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in (stack.get("services") or {}).items():
        yield name, service or {}


def _names(entries: Any, key: str = "source") -> list[str]:
    """Names from a short (strings) or long (mappings) list, or the keys of a mapping."""
    if isinstance(entries, dict):
        return list(entries)
    out = []
    for entry in entries or []:
        out.append(entry if isinstance(entry, str) else entry.get(key))
    return [n for n in out if n]


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long form (short "src:dst[:mode]" entries converted)."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append(entry)
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            out.append({"type": "volume", "target": parts[0]})
            continue
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith(("/", ".", "~", "$")) else "volume"
        out.append(
            {"type": kind, "source": source, "target": target, "read_only": "ro" in parts[2:]}
        )
    return out


def _secret_targets(service: dict[str, Any]) -> set[str]:
    targets = set()
    for entry in service.get("secrets") or []:
        if isinstance(entry, str):
            targets.add(entry)
        else:
            target = entry.get("target") or entry.get("source")
            targets.add(target.removeprefix("/run/secrets/"))
    return targets


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def reference_problems(stack: dict[str, Any], compose_dir: Path = ROOT) -> list[str]:
    out = []
    defined = {kind: set(stack.get(kind) or {}) for kind in ("secrets", "configs", "networks")}
    defined["volumes"] = set(stack.get("volumes") or {})
    used: dict[str, set[str]] = {kind: set() for kind in defined}
    services = set(stack.get("services") or {})
    for name, service in _services(stack):
        for kind in ("secrets", "configs"):
            for ref in _names(service.get(kind)):
                used[kind].add(ref)
                if ref not in defined[kind]:
                    out.append(f"service {name}: {kind[:-1]} {ref!r} is not defined in {kind}:")
        for ref in _names(service.get("networks")):
            used["networks"].add(ref)
            if ref not in defined["networks"] and ref != "default":
                out.append(f"service {name}: network {ref!r} is not defined in networks:")
        for mount in _mounts(service):
            if mount.get("type") == "volume" and mount.get("source"):
                used["volumes"].add(mount["source"])
                if mount["source"] not in defined["volumes"]:
                    out.append(
                        f"service {name}: volume {mount['source']!r} is not defined in volumes:"
                    )
            if mount.get("type") == "bind" and not str(mount.get("source", "")).startswith(
                ("/", "${")
            ):
                out.append(f"service {name}: bind mount {mount.get('source')!r} is not absolute")
        depends = service.get("depends_on") or []
        for ref in depends if isinstance(depends, list) else list(depends):
            if ref not in services:
                out.append(f"service {name}: depends_on {ref!r} is not a service")
    for kind, names in defined.items():
        for unused in sorted(names - used[kind]):
            out.append(f"{kind}: {unused!r} is defined but no service uses it")
    for secret, spec in (stack.get("secrets") or {}).items():
        spec = spec or {}
        if spec.get("external") is not True or "file" in spec or "environment" in spec:
            out.append(
                f"secrets: {secret!r} must be external (docker secret create), "
                "never from a file or a variable"
            )
    for config, spec in (stack.get("configs") or {}).items():
        file = (spec or {}).get("file")
        if file and not str(file).startswith(("/", "$")) and not (compose_dir / file).is_file():
            out.append(f"configs: {config!r}: file {file} does not exist")
    return out


def image_problems(stack: dict[str, Any], root: Path = ROOT) -> list[str]:
    out = []
    for name, service in _services(stack):
        image = service.get("image")
        if not image:
            out.append(f"service {name}: no image (docker stack deploy ignores build:)")
        elif OUR_IMAGE.match(str(image)):
            if not (root / "docker" / "Dockerfile").is_file():
                out.append(
                    f"service {name}: {image} is built by docker/Dockerfile, which is missing"
                )
        elif "$" in str(image) or not PINNED_IMAGE.match(str(image)):
            out.append(f"service {name}: image {image!r} is neither ours nor a plain pinned name")
        else:
            tag = str(image).split("@")[0].rpartition(":")[2] if ":" in str(image) else ""
            digest = "@sha256:" in str(image)
            if not digest and (not tag or tag == "latest" or not re.search(r"\d", tag)):
                out.append(f"service {name}: image {image!r} is not pinned to a version tag")
    return out


def _cmd_secrets(value: str) -> set[str]:
    """The secrets a `cryoflow-secret ...` command reads."""
    words = value.split()
    if not words or Path(words[0]).name != SECRET_CMD or len(words) < 2:
        return set()
    if words[1] in ("db-url", "pgpass"):
        if "--secret" in words and words.index("--secret") + 1 < len(words):
            return {words[words.index("--secret") + 1]}
        return {DB_SECRET}
    return {words[1]}


def _connection_secret_keys(value: str) -> list[str]:
    try:
        conn = json.loads(value)
    except ValueError:
        return []
    if not isinstance(conn, dict):
        return []
    extra = conn.get("extra") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            extra = {}
    keys = [k for k in conn if k.lower() in CONN_SECRET_KEYS and conn[k]]
    keys += [f"extra.{k}" for k in extra if k.lower() in CONN_SECRET_KEYS and extra[k]]
    return keys


def secret_value_problems(stack: dict[str, Any]) -> list[str]:
    """On the interpolated stack: no secret in an environment value, every secret read mounted."""
    out = []
    for name, service in _services(stack):
        mounted = _secret_targets(service)
        for key, value in _environment(service).items():
            where = f"service {name}: environment {key}"
            if SECRET_NAME.search(key.upper()) and not key.upper().endswith(SAFE_SUFFIXES):
                out.append(f"{where}: a secret's value in the environment (use {key}_CMD/_FILE)")
            if URL_WITH_PASSWORD.search(value):
                out.append(f"{where}: a URL with a password")
            if "-----BEGIN" in value:
                out.append(f"{where}: a private key")
            for bad in _connection_secret_keys(value):
                out.append(f"{where}: the connection holds {bad} (use a key_file in /run/secrets)")
            needed = set(SECRET_FILE.findall(value))
            if key.upper().endswith("_CMD"):
                needed |= _cmd_secrets(value)
            for secret in sorted(needed - mounted):
                out.append(f"{where} reads secret {secret!r}, which the service does not mount")
    return out


def health_problems(stack: dict[str, Any]) -> list[str]:
    out = []
    for name, service in _services(stack):
        check = service.get("healthcheck") or {}
        test = check.get("test")
        disabled = check.get("disable") is True or test in (["NONE"], "NONE")
        if test and not disabled:
            continue
        reason = service.get("x-healthcheck-exempt")
        if not (isinstance(reason, str) and reason.strip()):
            out.append(f"service {name}: no healthcheck and no x-healthcheck-exempt reason")
    return out


def policy_problems(stack: dict[str, Any]) -> list[str]:
    out = []
    for name, service in _services(stack):
        deploy = service.get("deploy") or {}
        if not (deploy.get("restart_policy") or {}).get("condition"):
            out.append(f"service {name}: no deploy.restart_policy.condition")
        if str(deploy.get("mode", "replicated")).endswith("-job"):
            continue
        update = deploy.get("update_config") or {}
        if update.get("failure_action") != "rollback":
            out.append(f"service {name}: deploy.update_config.failure_action is not rollback")
        if not deploy.get("rollback_config"):
            out.append(f"service {name}: no deploy.rollback_config")
        command = [str(c) for c in service.get("command") or []]
        if command[:2] == ["celery", "worker"]:
            if _environment(service).get("DUMB_INIT_SETSID") != "0":
                out.append(f"service {name}: a Celery worker needs DUMB_INIT_SETSID=0 (warm stop)")
            if not service.get("stop_grace_period"):
                out.append(f"service {name}: a Celery worker needs a stop_grace_period")
    return out


def _queues(command: list[str]) -> tuple[str, list[str]] | None:
    """("worker"|"triggerer", its queues) for an Airflow Celery worker or triggerer command."""
    words = [str(c) for c in command]
    if words[:1] == ["airflow"]:
        words = words[1:]
    if words[:2] == ["celery", "worker"]:
        kind = "worker"
    elif words[:1] == ["triggerer"]:
        kind = "triggerer"
    else:
        return None
    queues: list[str] = []
    for i, word in enumerate(words):
        if word in ("--queues", "-q") and i + 1 < len(words):
            queues += words[i + 1].split(",")
        elif word.startswith("--queues="):
            queues += word.split("=", 1)[1].split(",")
    return kind, queues


def placement_problems(stack: dict[str, Any], scopes: list[str]) -> list[str]:
    """On the raw stack (mount sources still name their variables)."""
    out = []
    serving: dict[tuple[str, str], list[str]] = {}
    for name, service in _services(stack):
        constraints = set(
            ((service.get("deploy") or {}).get("placement") or {}).get("constraints") or []
        )
        shares_rw: set[str] = set()
        shares: set[str] = set()
        gpfs = False
        for mount in _mounts(service):
            if mount.get("type") != "bind":
                continue
            source, target = str(mount.get("source", "")), str(mount.get("target", ""))
            if any(f"${{{var}" in source for var in (*GPFS_VARS, SHARE_VAR)) and source != target:
                out.append(f"service {name}: {source} is mounted at {target}, not at its own path")
            if any(f"${{{var}" in source for var in GPFS_VARS):
                gpfs = True
                if GPFS_LABEL not in constraints:
                    out.append(
                        f"service {name}: mounts GPFS ({source}) but is not placed on {GPFS_LABEL}"
                    )
            if f"${{{SHARE_VAR}" in source:
                scope = source.rstrip("/").rpartition("/")[2]
                if scope not in scopes:
                    out.append(f"service {name}: {source} is no microscope's share ({scopes})")
                    continue
                shares.add(scope)
                if not mount.get("read_only"):
                    shares_rw.add(scope)
                if share_label(scope) not in constraints:
                    out.append(
                        f"service {name}: mounts the share of {scope} but is not placed "
                        f"on {share_label(scope)}"
                    )
        role = _queues(service.get("command") or [])
        if role is None:
            continue
        kind, queues = role
        if not queues:
            out.append(f"service {name}: a {kind} without --queues (queues are per microscope)")
        for queue in queues:
            serving.setdefault((kind, queue), []).append(name)
            if queue == DEFAULT_QUEUE:
                needs: set[str] = set()
            elif queue.startswith("microscope-") and queue.removeprefix("microscope-") in scopes:
                needs = {queue.removeprefix("microscope-")}
            else:
                out.append(
                    f"service {name}: queue {queue!r} is neither {DEFAULT_QUEUE!r} nor a "
                    f"microscope's ({', '.join(map(scope_queue, scopes))})"
                )
                continue
            if not gpfs:
                out.append(f"service {name}: serves queue {queue!r} but does not mount GPFS")
            missing = needs - (shares_rw if kind == "worker" else shares)
            for scope in sorted(missing):
                how = "read-write" if kind == "worker" else "at all"
                out.append(
                    f"service {name}: serves queue {queue!r} but does not mount the share "
                    f"of {scope} {how}"
                )
    for queue in [DEFAULT_QUEUE, *map(scope_queue, scopes)]:
        for kind in ("worker", "triggerer"):
            if (kind, queue) not in serving:
                out.append(f"queue {queue!r}: no {kind} serves it")
    return out


def variable_problems(stack: dict[str, Any]) -> list[str]:
    return [
        f"variable {name}: different defaults {sorted(defaults)}"
        for name, defaults in sorted(variable_defaults(stack).items())
        if len(defaults) > 1
    ]


def problems(
    stack: dict[str, Any],
    *,
    schema: dict[str, Any],
    env: dict[str, str],
    scopes: list[str],
    root: Path = ROOT,
) -> list[str]:
    """Every problem of the stack; [] when it may be deployed."""
    resolved, out = interpolate(stack, env)
    out += schema_problems(resolved, schema)
    out += reference_problems(stack, root)
    out += image_problems(stack, root)
    out += secret_value_problems(resolved)
    out += health_problems(stack)
    out += policy_problems(resolved)
    out += placement_problems(stack, scopes)
    out += variable_problems(stack)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", nargs="?", type=Path, default=STACK)
    parser.add_argument("--env", type=Path, default=EXAMPLE_ENV, help="KEY=value file")
    args = parser.parse_args(argv)
    found = problems(
        load_stack(args.stack),
        schema=load_schema(),
        env=read_env_file(args.env),
        scopes=microscope_ids(),
        root=args.stack.resolve().parent,
    )
    for problem in found:
        print(problem)
    print(f"{args.stack}: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
