#!/usr/bin/env python3
"""Read Swarm secrets for Airflow's ``*_CMD`` settings and for libpq (installed as cryoflow-secret).

Airflow runs a ``*_CMD`` value without a shell and takes its standard output verbatim, so this
prints exactly the value: no trailing newline, whatever the secret file ends with.

    cryoflow-secret NAME                  the secret /run/secrets/NAME
    cryoflow-secret db-url DATABASE       postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE,
                                          the password from the db_password secret, URL-quoted
        [--scheme db+postgresql+psycopg]  (the Celery result backend's form)
    cryoflow-secret pgpass PATH           write a libpq password file (mode 0600) for the ledger,
                                          whose URL carries no password (PGPASSFILE=PATH)

USER, HOST and PORT default to $CRYOFLOW_DB_USER (cryoflow), $CRYOFLOW_DB_HOST (postgres) and
$CRYOFLOW_DB_PORT (5432); the secrets folder is $CRYOFLOW_SECRETS_DIR (/run/secrets). Errors name
the file, never a value. Standard library only: Airflow may run it many times.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

DB_PASSWORD = "db_password"


def secrets_dir() -> Path:
    return Path(os.environ.get("CRYOFLOW_SECRETS_DIR", "/run/secrets"))


def read_secret(name: str) -> str:
    """The secret's content without the line ending that `echo` or an editor may have added."""
    if not name or "/" in name or name.startswith("."):
        raise SystemExit(f"cryoflow-secret: not a secret name: {name!r}")
    path = secrets_dir() / name
    try:
        value = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"cryoflow-secret: cannot read {path}: {exc.strerror}") from None
    value = value.rstrip("\r\n")
    if not value:
        raise SystemExit(f"cryoflow-secret: {path} is empty")
    return value


def _db(args: argparse.Namespace) -> tuple[str, str, str]:
    user = args.user or os.environ.get("CRYOFLOW_DB_USER", "cryoflow")
    host = args.host or os.environ.get("CRYOFLOW_DB_HOST", "postgres")
    port = args.port or os.environ.get("CRYOFLOW_DB_PORT", "5432")
    return user, host, port


def db_url(database: str, *, user: str, host: str, port: str, password: str, scheme: str) -> str:
    return (
        f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/"
        f"{quote(database, safe='')}"
    )


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_line(*, host: str, port: str, user: str, password: str) -> str:
    """One line of a libpq password file: any database of HOST:PORT as USER."""
    f = _pgpass_field
    return ":".join((f(host), f(port), "*", f(user), f(password))) + "\n"


def write_pgpass(path: Path, line: str) -> None:
    """Write PATH with mode 0600 (libpq ignores a password file others can read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("db-url", "pgpass"):
        parser = argparse.ArgumentParser(prog=f"cryoflow-secret {argv[0]}")
        parser.add_argument("target", help="database name (db-url) or file to write (pgpass)")
        parser.add_argument("--scheme", default="postgresql+psycopg")
        parser.add_argument("--user")
        parser.add_argument("--host")
        parser.add_argument("--port")
        parser.add_argument("--secret", default=DB_PASSWORD)
        args = parser.parse_args(argv[1:])
        user, host, port = _db(args)
        password = read_secret(args.secret)
        if argv[0] == "db-url":
            url = db_url(
                args.target, user=user, host=host, port=port, password=password, scheme=args.scheme
            )
            sys.stdout.write(url)
        else:
            line = pgpass_line(host=host, port=port, user=user, password=password)
            write_pgpass(Path(args.target), line)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.stderr.write(__doc__ or "")
        return 2
    sys.stdout.write(read_secret(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
