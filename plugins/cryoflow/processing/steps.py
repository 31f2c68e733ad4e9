"""The processing step graph: what a verified file owes, and what a finished step leads to.

One place for the order MotionCor2 -> (CTFFIND, DoG picker) and the session form's switches;
ingest uses it when a file is verified, processing when a step is done (both write the owed
steps into the ledger in the same transaction as the result that causes them).
"""

from __future__ import annotations

from typing import Protocol

STAGES = ("motioncor", "ctf", "picking")
MOVIE_KIND = "movie"


class Switches(Protocol):
    motioncor: bool
    ctf: bool
    picking: bool


def first_steps(switches: Switches, kind: str) -> list[str]:
    """Movies owe motion correction; every other step follows it (CTF needs the aligned sum)."""
    return ["motioncor"] if kind == MOVIE_KIND and switches.motioncor else []


def downstream(stage: str, switches: Switches) -> list[str]:
    """The steps a movie owes once ``stage`` is done for it."""
    if stage != "motioncor":
        return []
    return [st for st, on in (("ctf", switches.ctf), ("picking", switches.picking)) if on]
