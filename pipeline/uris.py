"""``input.uri`` as written: one URI or a list, each of which may hold brace patterns; no I/O here.

An entry's brace patterns are expanded with the ``braceexpand`` package (the one WebDataset uses): zero-padded integer
ranges (``shard-{0000..0099}.tar``), alternatives (``{train,val}/``), nested and stepped ranges; ``\\{`` is a literal
brace. Each expanded string is then a file, a folder or a glob pattern, as a one-string input is
(``clipmaps.pipeline.manifests.list_manifest_files``, which also takes an existing path holding brace characters
literally).

Markers record a file by its path relative to the *manifest root* (``clipmaps.pipeline.shards``). For a list or a
brace pattern the root is the common folder of what the entries fix (:func:`entry_folder`): the folder before an
entry's first brace or glob character, a folder entry itself, a plain file entry's parent folder. So growing a range
(``{0000..0099}`` → ``{0000..0199}``) or adding files beside the listed ones keeps every recorded path, and a re-run
keeps the finished shards and processes the new files only. One input lives in one store: entries of different
schemes, or of different buckets, are refused (:func:`mixed_store_problem`).
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import re
from collections.abc import Sequence

from braceexpand import UnbalancedBracesError, braceexpand

from clipmaps.schemas.storage import _location, redact_uri, uri_scheme

logger = logging.getLogger(__name__)

#: Most strings one input may expand to (a typo such as ``{0..99999999}`` is refused instead of filling memory).
MAX_EXPANDED = 1_000_000
#: Characters that start a pattern in an entry (braces, then fsspec's glob characters).
PATTERN_CHARACTERS = "{*?["


def entries_of(value: str | Sequence[str]) -> list[str]:
    """``input.uri`` (one string or a list of strings) as a list of entries, as written."""
    return [value] if isinstance(value, str) else list(value)


def has_braces(text: str) -> bool:
    """Whether ``text`` holds a brace character (it may be a brace pattern)."""
    return "{" in text or "}" in text


def _expansions(text: str, count: int, limit: int = MAX_EXPANDED) -> list[str] | None:
    """Up to ``count`` strings brace pattern ``text`` expands to; None when its ranges alone exceed ``limit``
    (braceexpand builds each range whole: ``{0..999999999}`` would fill the memory, so it is not called).

    Raises:
        ValueError: unbalanced braces (naming the redacted entry)."""
    if range_bound(text) > limit:
        return None
    try:
        return list(itertools.islice(braceexpand(text), count))
    except UnbalancedBracesError as e:
        raise ValueError(f"{redact_uri(text)!r} is not a valid brace pattern ({e})") from None


def expand(text: str, limit: int = MAX_EXPANDED) -> list[str]:
    """The strings brace pattern ``text`` stands for, in order (``[text]`` when it has none).

    Raises:
        ValueError: unbalanced braces, or more than ``limit`` strings (naming the redacted entry).
    """
    if not has_braces(text):
        return [text]
    out = _expansions(text, limit + 1, limit)
    if out is None or len(out) > limit:
        raise ValueError(f"{redact_uri(text)!r} expands to more than {limit:,} entries")
    return out


_RANGE = re.compile(r"(?<!\\)\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")


def range_bound(text: str) -> int:
    """An upper bound of the strings the integer ranges of ``text`` (``{0000..0099}``, ``{0..90..10}``) expand to:
    the product of their lengths (1 without ranges). Counted from the numbers, without expanding anything."""
    bound = 1
    for start, end, step in _RANGE.findall(text):
        a, b, c = int(start), int(end), abs(int(step or 1)) or 1
        bound *= abs(b - a) // c + 1
    return bound


def is_pattern(text: str) -> bool:
    """Whether brace expansion changes ``text`` (``{a}`` and ``{}`` are literal, as in bash).

    Raises:
        ValueError: unbalanced braces."""
    if not has_braces(text):
        return False
    out = _expansions(text, 2)
    return out is None or out != [text]  # a range too long to build is a pattern


def first_expansion(text: str) -> str:
    """The first string ``text`` expands to (itself for a literal, malformed or too long pattern)."""
    if not has_braces(text):
        return text
    try:
        out = _expansions(text, 1)
    except ValueError:
        return text
    return out[0] if out else text


def fixed_prefix(text: str) -> str:
    """``text`` up to its first pattern character (brace or glob); all of it when it has none."""
    cut = min((i for i in (text.find(c) for c in PATTERN_CHARACTERS) if i >= 0), default=len(text))
    return text[:cut]


def entry_folder(path: str, *, kind: str) -> str:
    """The folder an entry fixes, for the manifest root of a list or pattern.

    Args:
        path: the entry as a path inside its filesystem (protocol stripped).
        kind: ``pattern`` (braces or glob characters: the folder before the first one), ``folder`` (the folder
            itself) or ``file`` (its parent folder).
    """
    if kind == "folder":
        return path.rstrip("/") or "/"
    head = fixed_prefix(path) if kind == "pattern" else path
    if "/" not in head:
        return ""
    folder = head.rsplit("/", 1)[0]
    return folder or "/"


def common_folder(folders: Sequence[str]) -> str:
    """The deepest folder that holds every one of ``folders`` (compared by ``/``-separated components)."""
    if not folders:
        return ""
    split = [f.split("/") for f in folders]
    common: list[str] = []
    for parts in zip(*split):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    out = "/".join(common)
    if not out and all(f.startswith("/") for f in folders):
        return "/"
    return out


def relative(name: str, root: str) -> str:
    """``name``'s path below ``root`` (``/``-separated; ``root`` ``""`` or ``/`` keeps ``name`` relative)."""
    if root in ("", "/"):
        return name.lstrip("/")
    return posixpath.relpath(name, root)


def mixed_store_problem(entries: Sequence[str]) -> str | None:
    """Why ``entries`` cannot be one input (they name more than one store: schemes, or buckets of one scheme), or
    None. Local paths and ``file://`` URIs are one store."""
    first = None
    for e in entries:
        scheme, parts = _location(first_expansion(e))
        store = (scheme, parts[0] if scheme != "file" and parts else "")
        if first is None:
            first = (store, e)
        elif store != first[0]:
            what = "schemes" if store[0] != first[0][0] else "buckets"
            return (
                f"the entries name different {what}: {redact_uri(first[1])!r} and {redact_uri(e)!r}; one input lives "
                "in one store (one scheme and bucket): run one job per store"
            )
    return None


def describe(value: str | Sequence[str]) -> str:
    """``input.uri`` for messages, redacted: the pattern as written, or a list's first entry and how many more."""
    entries = entries_of(value)
    if not entries:
        return "(no input)"
    first = str(redact_uri(entries[0]))
    return first if len(entries) == 1 else f"{first} and {len(entries) - 1} more"


def schemes(value: str | Sequence[str]) -> set[str]:
    """The URI schemes of ``input.uri``'s entries (``file`` for local paths)."""
    return {uri_scheme(e) for e in entries_of(value)}


__all__ = [
    "MAX_EXPANDED",
    "common_folder",
    "describe",
    "entries_of",
    "entry_folder",
    "expand",
    "first_expansion",
    "fixed_prefix",
    "has_braces",
    "is_pattern",
    "mixed_store_problem",
    "relative",
    "schemes",
]
