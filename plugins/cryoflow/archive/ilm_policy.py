"""A small evaluator for the subset of the GPFS ILM policy language that
``config/gpfs/hsm-migrate.pol`` uses, so a test can prove on real files (path + real extended
attributes) which of them the shipped policy would send to tape, without GPFS.

Understood: ``/* */`` comments; ``RULE ['name']`` with ``EXTERNAL POOL 'p' EXEC 's' [OPTS 'o']``,
``EXCLUDE [FROM POOL 'p'] [WHERE e]`` and ``MIGRATE [FROM POOL 'p'] [THRESHOLD(h[,l[,p]])]
[WEIGHT(e)] TO POOL 'p' [WHERE e]``; in expressions ``OR AND NOT``, ``= <> != < > <= >=``,
``[NOT] LIKE`` (``%`` and ``_``), ``IS [NOT] NULL``, ``+ - ||``, parentheses, string and integer
literals, ``XATTR('name')``, ``LOWER UPPER DAYS`` and the file attributes listed in
``_ATTRIBUTES``. Anything else is a :class:`PolicyError` naming the line: an edit the evaluator
cannot judge must break the test, not be silently misjudged.

As in GPFS, rules are tried in order and the first whose WHERE is true decides; SQL NULL (a
missing attribute) makes a comparison unknown, and unknown is not true. Not judged: FROM POOL
(the file's pool), THRESHOLD (pool occupancy) and WEIGHT (order) are parsed and checked only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>/\*.*?\*/)|(?P<string>'(?:[^']|'')*')|(?P<number>\d+)
    |(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<op><>|!=|<=|>=|\|\||[=<>(),+\-])""",
    re.DOTALL | re.VERBOSE,
)
# File attributes: those evaluated from FileFacts, and those only allowed where nothing is
# evaluated (WEIGHT), since their value depends on the file system's clock and inode.
_EVALUATED = {"PATH_NAME", "NAME", "FILE_SIZE"}
_ATTRIBUTES = _EVALUATED | {"KB_ALLOCATED", "ACCESS_TIME", "MODIFICATION_TIME", "CURRENT_TIMESTAMP"}
_FUNCTIONS = {"XATTR", "LOWER", "UPPER", "DAYS"}
_COMPARE = {"=", "<>", "!=", "<", ">", "<=", ">="}


class PolicyError(ValueError):
    """The policy uses something this evaluator does not understand, or is malformed."""


@dataclass(frozen=True)
class Token:
    kind: str  # string, number, word, op, end
    text: str
    line: int

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "word" else self.text


@dataclass(frozen=True)
class FileFacts:
    """What a rule may look at: the full path (as GPFS's PATH_NAME), its user attributes."""

    path: str
    xattrs: Mapping[str, str] = field(default_factory=dict)
    size: int | None = None


@dataclass(frozen=True)
class Decision:
    rule: str | None  # the rule that decided, None when no rule applies
    action: str | None  # "exclude", "migrate" or None
    pool: str | None = None


Expr = Callable[[FileFacts], Any]


@dataclass(frozen=True)
class Rule:
    name: str | None
    kind: str  # external_pool, exclude, migrate
    where: Expr | None = None
    to_pool: str | None = None
    from_pool: str | None = None
    line: int = 0
    script: str | None = None  # EXEC of an EXTERNAL POOL


@dataclass
class Policy:
    rules: list[Rule]
    external_pools: dict[str, str]  # pool -> EXEC script
    xattr_names: set[str]

    def decide(self, facts: FileFacts) -> Decision:
        for rule in self.rules:
            if rule.kind == "external_pool":
                continue
            if rule.where is not None and rule.where(facts) is not True:
                continue
            action = "exclude" if rule.kind == "exclude" else "migrate"
            return Decision(rule.name, action, rule.to_pool)
        return Decision(None, None)

    def selects(self, facts: FileFacts) -> bool:
        """True when the policy would (pre)migrate this file to an external pool."""
        return self.decide(facts).action == "migrate"


def file_facts(path: Path) -> FileFacts:
    """The facts of a real file: its absolute path and every attribute it carries."""
    absolute = os.path.abspath(path)
    xattrs = {
        name: os.fsdecode(os.getxattr(absolute, name, follow_symlinks=False))
        for name in os.listxattr(absolute, follow_symlinks=False)
    }
    return FileFacts(absolute, xattrs, os.stat(absolute, follow_symlinks=False).st_size)


def load_policy(path: Path) -> Policy:
    return parse_policy(path.read_text(encoding="utf-8"))


def parse_policy(text: str) -> Policy:
    return _Parser(text).policy()


def _tokens(text: str) -> Iterator[Token]:
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            if text.startswith("/*", pos):
                raise PolicyError(f"line {line}: comment never closed")
            raise PolicyError(f"line {line}: cannot read {text[pos : pos + 20]!r}")
        kind = match.lastgroup or ""
        if kind not in ("ws", "comment"):
            yield Token(kind, match.group(), line)
        line += match.group().count("\n")
        pos = match.end()
    yield Token("end", "", line)


def _like(pattern: str) -> re.Pattern[str]:
    parts = ("." if ch == "_" else ".*" if ch == "%" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = list(_tokens(text))
        self.at = 0
        self.xattrs: set[str] = set()
        self.evaluated = True  # False inside WEIGHT(): attributes that need the inode are fine

    # -- token helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.at]

    def fail(self, what: str) -> PolicyError:
        shown = self.tok.text or "end of file"
        return PolicyError(f"line {self.tok.line}: {what}, found {shown!r}")

    def take(self, *words: str) -> bool:
        if self.tok.upper in words and self.tok.kind in ("word", "op"):
            self.at += 1
            return True
        return False

    def expect(self, *words: str) -> None:
        if not self.take(*words):
            raise self.fail(f"expected {' '.join(words)}")

    def string(self) -> str:
        if self.tok.kind != "string":
            raise self.fail("expected a quoted string")
        text = self.tok.text[1:-1].replace("''", "'")
        self.at += 1
        return text

    def number(self) -> int:
        if self.tok.kind != "number":
            raise self.fail("expected a number")
        value = int(self.tok.text)
        self.at += 1
        return value

    # -- rules
    def policy(self) -> Policy:
        rules: list[Rule] = []
        pools: dict[str, str] = {}
        while self.tok.kind != "end":
            rule = self.rule()
            if rule.kind == "external_pool":
                pools[rule.to_pool or ""] = rule.script or ""
            rules.append(rule)
        for rule in rules:
            if rule.kind == "migrate" and rule.to_pool not in pools:
                raise PolicyError(
                    f"line {rule.line}: MIGRATE TO POOL {rule.to_pool!r} is not an EXTERNAL POOL"
                    " defined in this file (moves between disk pools are not judged here)"
                )
        return Policy(rules, pools, self.xattrs)

    def rule(self) -> Rule:
        line = self.tok.line
        self.expect("RULE")
        name = self.string() if self.tok.kind == "string" else None
        if self.take("EXTERNAL"):
            self.expect("POOL")
            pool = self.string()
            self.expect("EXEC")
            script = self.string()
            if self.take("OPTS"):
                self.string()
            return Rule(name, "external_pool", to_pool=pool, line=line, script=script)
        if self.take("EXCLUDE"):
            from_pool = self.from_pool()
            return Rule(name, "exclude", self.where(), from_pool=from_pool, line=line)
        if self.take("MIGRATE"):
            from_pool = self.from_pool()
            if self.take("THRESHOLD"):
                self.threshold()
            if self.take("WEIGHT"):
                self.expect("(")
                self.evaluated = False
                self.expr()
                self.evaluated = True
                self.expect(")")
            self.expect("TO")
            self.expect("POOL")
            to_pool = self.string()
            return Rule(name, "migrate", self.where(), to_pool, from_pool, line)
        raise self.fail("this evaluator knows only EXTERNAL POOL, EXCLUDE and MIGRATE rules")

    def from_pool(self) -> str | None:
        if not self.take("FROM"):
            return None
        self.expect("POOL")
        return self.string()

    def threshold(self) -> None:
        line = self.tok.line
        self.expect("(")
        values = [self.number()]
        while len(values) < 3 and self.take(","):
            values.append(self.number())
        self.expect(")")
        if any(v > 100 for v in values):
            raise PolicyError(f"line {line}: THRESHOLD percentages {values} above 100")

    def where(self) -> Expr | None:
        if not self.take("WHERE"):
            if self.tok.kind != "end" and self.tok.upper != "RULE":
                raise self.fail("this evaluator knows no clause here (WHEN, FOR FILESET, ...)")
            return None
        expr = self.expr()
        if self.tok.kind != "end" and self.tok.upper != "RULE":
            raise self.fail("expected the next RULE")
        return expr

    # -- expressions (SQL precedence: OR < AND < NOT < predicate < +,-,|| < primary)
    def expr(self) -> Expr:
        parts = [self.conj()]
        while self.take("OR"):
            parts.append(self.conj())
        return parts[0] if len(parts) == 1 else _or(parts)

    def conj(self) -> Expr:
        parts = [self.negation()]
        while self.take("AND"):
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else _and(parts)

    def negation(self) -> Expr:
        if self.take("NOT"):
            inner = self.negation()
            return lambda f: None if (v := inner(f)) is None else not v
        return self.predicate()

    def predicate(self) -> Expr:
        left = self.additive()
        op = self.tok.upper
        if self.tok.kind == "op" and op in _COMPARE:
            self.at += 1
            return _compare(op, left, self.additive())
        negate = self.take("NOT")
        if self.take("LIKE"):
            if self.tok.kind != "string":
                raise self.fail("this evaluator needs a literal LIKE pattern")
            rx = _like(self.string())  # LIKE ... ESCAPE is then "expected the next RULE"

            def like(f: FileFacts) -> bool | None:
                value = left(f)
                if value is None:
                    return None
                return (rx.fullmatch(_text(value)) is not None) != negate

            return like
        if negate:
            raise self.fail("expected LIKE after NOT")
        if self.take("IS"):
            want_null = not self.take("NOT")
            self.expect("NULL")
            return lambda f: (left(f) is None) == want_null
        return left

    def additive(self) -> Expr:
        left = self.primary()
        while self.tok.kind == "op" and self.tok.text in ("+", "-", "||"):
            op = self.tok.text
            self.at += 1
            left = _arith(op, left, self.primary())
        return left

    def primary(self) -> Expr:
        tok = self.tok
        if tok.kind == "string":
            value = self.string()
            return lambda f: value
        if tok.kind == "number":
            number = self.number()
            return lambda f: number
        if self.take("("):
            inner = self.expr()
            self.expect(")")
            return inner
        if tok.kind != "word":
            raise self.fail("expected a value")
        word = tok.upper
        self.at += 1
        if word in _FUNCTIONS:
            return self.call(word, tok)
        if word in _ATTRIBUTES:
            if word not in _EVALUATED and self.evaluated:
                raise PolicyError(
                    f"line {tok.line}: {word} depends on the file system; this evaluator "
                    "allows it only inside WEIGHT()"
                )
            return _attribute(word)
        raise PolicyError(f"line {tok.line}: unknown name {tok.text!r}")

    def call(self, word: str, tok: Token) -> Expr:
        self.expect("(")
        if word == "XATTR":
            if self.tok.kind != "string":
                raise self.fail("this evaluator needs XATTR('literal name')")
            name = self.string()
            self.xattrs.add(name)
            self.expect(")")  # XATTR(name, start, length) is not understood
            return lambda f: f.xattrs.get(name)
        arg = self.expr()
        self.expect(")")
        if word == "DAYS":
            if self.evaluated:
                raise PolicyError(f"line {tok.line}: DAYS() is allowed only inside WEIGHT()")
            return lambda f: None
        convert = str.lower if word == "LOWER" else str.upper
        return lambda f: None if (v := arg(f)) is None else convert(_text(v))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"expected a string value, got {value!r}")
    return value


def _attribute(word: str) -> Expr:
    if word == "PATH_NAME":
        return lambda f: f.path
    if word == "NAME":
        return lambda f: f.path.rsplit("/", 1)[-1]
    if word == "FILE_SIZE":
        return lambda f: f.size
    return lambda f: None  # only reachable inside WEIGHT(), which is never evaluated


def _or(parts: list[Expr]) -> Expr:
    def evaluate(f: FileFacts) -> bool | None:
        values = [p(f) for p in parts]
        return True if True in values else None if None in values else False

    return evaluate


def _and(parts: list[Expr]) -> Expr:
    def evaluate(f: FileFacts) -> bool | None:
        values = [p(f) for p in parts]
        return False if False in values else None if None in values else True

    return evaluate


def _compare(op: str, left: Expr, right: Expr) -> Expr:
    def evaluate(f: FileFacts) -> bool | None:
        a, b = left(f), right(f)
        if a is None or b is None:
            return None
        if isinstance(a, str) != isinstance(b, str):
            raise PolicyError(f"cannot compare {a!r} {op} {b!r}")
        if op == "=":
            return a == b
        if op in ("<>", "!="):
            return a != b
        return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]

    return evaluate


def _arith(op: str, left: Expr, right: Expr) -> Expr:
    def evaluate(f: FileFacts) -> Any:
        a, b = left(f), right(f)
        if a is None or b is None:
            return None
        if op == "||":
            return _text(a) + _text(b)
        if isinstance(a, str) or isinstance(b, str):
            raise PolicyError(f"cannot compute {a!r} {op} {b!r}")
        return a + b if op == "+" else a - b

    return evaluate
