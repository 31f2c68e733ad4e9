"""File names as data: any name the microscope PC can write, stored losslessly and shown safely.

Python reads a name that is not valid UTF-8 as a ``str`` with lone surrogates (PEP 383,
``surrogateescape``). Such a string cannot be encoded for the database, a log line or a JSON file.
``to_text``/``from_text`` map it to and from plain text without loss (every other name is stored
as it is), and ``shown`` renders any name on one log line.
"""

from __future__ import annotations

import re

_SURROGATES = re.compile("[\udc80-\udcff\\\\]")
_ESCAPES = re.compile(r"\\(\\|x[0-9a-f]{2})")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return "\\\\" if ch == "\\" else f"\\x{ord(ch) - 0xDC00:02x}"


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    return "\\" if code == "\\" else chr(0xDC00 + int(code[1:], 16))


def to_text(name: str) -> str:
    """Storable text for a file-system name: undecodable bytes become ``\\xHH``, a backslash
    becomes ``\\\\`` (so the mapping is one-to-one); any other name is unchanged."""
    return _SURROGATES.sub(_escape, name) if _SURROGATES.search(name) else name


def from_text(text: str) -> str:
    """The file-system name back from :func:`to_text`."""
    return _ESCAPES.sub(_unescape, text) if "\\" in text else text


def shown(name: object) -> str:
    """A name for a log line: control characters and undecodable bytes escaped (a newline in a
    name must not start a new, forged log line)."""
    text = str(name)
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1].replace("\\udc", "\\x"), text)


def portable(name: str) -> str:
    """A name for files the product derives from a movie (outputs, STAR rows, job scripts):
    undecodable bytes become ``%HH`` so every derived name is valid UTF-8."""
    if not _SURROGATES.search(name):
        return name
    return re.sub("[\udc80-\udcff]", lambda m: f"%{ord(m.group()) - 0xDC00:02X}", name)
