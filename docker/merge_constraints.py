#!/usr/bin/env python3
"""Merge the official image's constraints with cryoflow's exact pins (used by docker/Dockerfile).

    merge_constraints.py IMAGE_CONSTRAINTS OUT PINS...

The official apache/airflow image ships the constraints it was built with (~/constraints.txt).
cryoflow's pins (requirements.lock, docker/requirements-stack.txt) are what its tests ran on, so
for a package both name, the pin wins; every package cryoflow does not pin keeps the image's
constraint. Each override is printed in the build log, so a difference from the official set is
visible, never silent. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, tuple[str, str]]:
    """``name==version`` lines (extras and markers dropped): canonical name -> (name, version)."""
    pins: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = (match.group(1), match.group(3))
    return pins


def merge(image: str, pins: dict[str, tuple[str, str]]) -> tuple[str, list[str]]:
    """The merged constraints text, and one note per image constraint a pin replaced."""
    out: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    for line in image.splitlines():
        match = _PIN.match(line)
        if not match:
            out.append(line)
            continue
        key = canonical(match.group(1))
        if key in pins:
            name, version = pins[key]
            seen.add(key)
            if version != match.group(3):
                notes.append(f"{name}: image {match.group(3)} -> cryoflow {version}")
            out.append(f"{name}=={version}")
        else:
            out.append(line.strip())
    extra = sorted(k for k in pins if k not in seen)
    if extra:
        out.append("# pinned by cryoflow, not in the image's constraints")
        out.extend(f"{pins[k][0]}=={pins[k][1]}" for k in extra)
    return "\n".join(out) + "\n", notes


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write(__doc__ or "")
        return 2
    image_path, out_path, *pin_paths = (Path(a) for a in argv)
    pins: dict[str, tuple[str, str]] = {}
    for path in pin_paths:
        pins.update(read_pins(path.read_text()))
    if image_path.is_file():
        image = image_path.read_text()
    else:
        print(f"merge_constraints: {image_path} not found; only cryoflow's pins apply")
        image = ""
    text, notes = merge(image, pins)
    out_path.write_text(text)
    print(f"merge_constraints: {len(pins)} cryoflow pins; {len(notes)} differ from the image's:")
    for note in notes:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
