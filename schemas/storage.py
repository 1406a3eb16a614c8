"""Storage: URIs (schemes, joining, containment), fsspec filesystems, atomic writes, and the one redaction rule.

Every part of clipmaps that reads or writes object storage, or puts a URI or an exception message into a log, an
error row, ``_job.json`` or the terminal, goes through this module, so that there is one scheme regex, one list of
secret-looking names and one way of hiding credentials:

* :func:`redact_uri` hides the userinfo of a URI (``s3://user:secret@bucket`` → ``s3://***@bucket``) and the
  values of query parameters named like a secret (presigned ``X-Amz-Signature``, ``X-Goog-Credential``, Azure SAS
  ``sig``…); :func:`is_secret_name` is the naming rule.
* :func:`redact_options` hides storage-option values under secret-like keys, at any depth (``client_kwargs``…).
* :func:`read_bytes`, :func:`remove` and :func:`exists` take every path literally: fsspec expands ``[ ]``, ``*``,
  ``?`` (and ``{ }`` in some filesystems) as glob patterns in ``cat``, ``rm`` and ``expand_path``, so an output
  folder named ``run[1]`` would be read, or deleted, as the pattern ``run1``. ``open``, ``exists``, ``ls``,
  ``find``, ``cat_file`` and ``rm_file`` are literal in fsspec and may be called on the filesystem directly.
* :func:`redact_text` scrubs free text: client libraries quote secrets without their scheme (botocore:
  ``Invalid bucket name "user:secret@bucket"``), so it removes every secret value it is told about (from storage
  options and URIs), the credentials of every URI in the text, and ``name=value`` pairs with secret-like names.

Imports only the standard library, fsspec and pyarrow: the driver, the workers and the CLI all use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: What a hidden secret reads as.
REDACTED = "***"
#: Schemes image and mask URIs may use by default: local files (bare paths, ``file://``), S3, Google Cloud Storage.
DEFAULT_ALLOWED_SCHEMES: tuple[str, ...] = ("file", "s3", "gs", "gcs")
#: A URI's scheme (RE2 and Python syntax alike). Two letters at least: ``C://x`` is a Windows drive, not a scheme.
SCHEME_PATTERN = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+)://"
#: Object stores whose writes are atomic (an object appears whole when the upload completes, or not at all).
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss", "r2"})
#: Prefix of the temporary files :func:`write_bytes` renames into place (no ``*.parquet`` glob matches them).
TMP_PREFIX = "_tmp-"

_SCHEME = re.compile(SCHEME_PATTERN)
# Words that make a name secret. Matched per word of the name (split at "_", "-", "." and camelCase), as the word,
# its start or its end, so that "aws_secret_access_key", "X-Amz-Security-Token", "sessionToken", "apikey" and
# "credentials" count, while "SignedHeaders", "endpoint_url" and "monkeypatch" do not.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "signature", "auth", "session")
_SECRET_EXACT = frozenset({"key", "sig", "sas", "pwd"})
# Names (words joined) that contain a secret word but hold none (botocore's "signature_version: s3v4"), and names
# that hold a secret without a secret word.
_NOT_SECRET = frozenset({"signatureversion"})
_SECRET_JOINED = frozenset({"connectionstring"})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# Shorter values are not credentials, and replacing them everywhere would mangle messages.
_MIN_SECRET_CHARS = 6
_URI_IN_TEXT = re.compile(r"(?<![\w+.\-])[A-Za-z][A-Za-z0-9+.\-]+://[^\s'\"`<>]+")
_PAIR_IN_TEXT = re.compile(r"(?<![\w.\-])(?P<name>[A-Za-z][\w.\-]*)=(?P<value>[^&\s'\"`<>,;)]+)")
# "user:secret@host" without a scheme (botocore: Invalid bucket name "AKIA:secret@bucket"): the userinfo runs to
# the last "@" of the word (a secret may hold "@", "/", "+" and ":"); "s3://…" (the colon of a scheme) and a word
# inside a path are left to the URI pass.
_USERINFO_IN_TEXT = re.compile(r"(?<![\w.~%+\-/:@*])[\w.~%+\-]+:(?!//)[^\s'\"`<>]+@(?=[\w\[])")
#: Schemes of object stores (s3fs, gcsfs, adlfs, ocifs…): their filesystems take credentials from storage_options or
#: the environment, never from a URI's ``user:pass@`` (s3fs reads it as part of the bucket name).
OBJECT_STORE_SCHEMES = frozenset(
    {"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "wasb", "wasbs", "oss", "r2", "oci", "cos"}
)
_QUOTED_PAIR = re.compile(r"(?P<q>['\"])(?P<name>[\w.\-]{1,64})(?P=q)(?P<sep>\s*:\s*)(?P<v>['\"])(?P<value>.*?)(?P=v)")


# ------------------------------------------------------------------------------------------------ schemes
def uri_scheme(uri: str) -> str:
    """The lower-case scheme of ``uri`` (``"s3"`` for ``S3://b/k``); bare paths and Windows drive paths (``C:/x``,
    ``C:\\x``) are ``"file"``."""
    m = _SCHEME.match(uri)
    return m.group("scheme").lower() if m else "file"


def uri_schemes(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """:func:`uri_scheme` of every string of ``uris`` at once (nulls stay null), for validating whole manifests."""
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    found = pc.extract_regex(uris, SCHEME_PATTERN)  # null where there is no scheme
    scheme = pc.if_else(pc.is_null(found), pa.scalar("file"), pc.utf8_lower(found.field("scheme")))
    return pc.if_else(pc.is_valid(uris), scheme, pa.scalar(None, pa.string()))


def scheme_error(uri: str, allowed: Iterable[str]) -> str | None:
    """Why ``uri`` may not be read under ``allowed`` schemes (exact, case-insensitive names: ``s3a`` is not
    ``s3``), or ``None`` when it may. The message names the scheme, the URI (redacted) and the allowed list; callers
    wrap it in their own error (an ``errors/`` row of stage ``manifest`` or ``read``, a spec problem)."""
    names = sorted({s.lower() for s in allowed})
    scheme = uri_scheme(uri)
    if scheme in names:
        return None
    return f"URI scheme {scheme!r} of {redact_uri(uri)} is not allowed (allowed: {', '.join(names)})"


def userinfo_error(uri: Any) -> str | None:
    """Why ``uri`` may not be used as an object-store location, or ``None``: an object-store URI
    (:data:`OBJECT_STORE_SCHEMES`) with a ``user:pass@`` userinfo, which s3fs, gcsfs and adlfs cannot use (s3fs takes
    it for part of the bucket name and quotes it in its errors). The message shows the URI redacted and says where
    credentials go. ``http(s)`` basic auth is allowed (fsspec's HTTP filesystem sends it); non-strings pass."""
    if not isinstance(uri, str) or uri_scheme(uri) not in OBJECT_STORE_SCHEMES:
        return None
    m = _SCHEME.match(uri)
    userinfo, _ = _split_userinfo(uri[m.end() :])
    if userinfo is None:
        return None
    return (
        f"{redact_uri(uri)} carries credentials in the URI ('user:secret@'), which {uri_scheme(uri)}:// storage "
        "cannot use: remove them and give them in storage_options (e.g. key/secret) or the environment "
        "(AWS_ACCESS_KEY_ID…, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_…)"
    )


# ------------------------------------------------------------------------------------------------ locations
def join_uri(root: str, *names: str) -> str:
    """``root`` joined with relative ``names`` by ``/`` (also for local paths; ``root``'s scheme is kept;
    backslashes in names become ``/``). An empty ``root`` gives the names alone."""
    parts = [n.replace("\\", "/").strip("/") for n in names]
    joined = "/".join(p for p in parts if p)
    if not root:
        return joined
    return root.rstrip("/") + "/" + joined if joined else root


def is_inside(inner: str, outer: str) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it (no I/O). Local paths are compared absolute and normalised;
    URIs by scheme (``s3a``/``s3n`` = ``s3``, ``gcs`` = ``gs``) and path components, ignoring credentials and, for
    ``http(s)`` URIs, queries (an object key may contain ``?``, which is then part of the path)."""
    (s1, p1), (s2, p2) = _location(inner), _location(outer)
    return s1 == s2 and p1[: len(p2)] == p2


def _location(uri: str) -> tuple[str, tuple[str, ...]]:
    scheme = uri_scheme(uri)
    m = _SCHEME.match(uri)
    if scheme == "file":
        path = uri[m.end() :] if m else uri
        path = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
        return "file", Path(path).parts
    rest = uri[m.end() :]
    if scheme in ("http", "https"):  # a query there is not part of the location; an object key may hold "?"
        rest = rest.split("?", 1)[0]
    _, rest = _split_userinfo(rest)
    scheme = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme, scheme)
    return scheme, tuple(p for p in rest.split("/") if p)


# ------------------------------------------------------------------------------------------------ filesystems
def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a local path or URI.

    Raises:
        ValueError, ImportError: an unknown protocol or a missing driver package (fsspec's errors).
    """
    import fsspec

    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


#: Characters fsspec's ``glob`` and ``expand_path`` read as a pattern (``has_magic``: ``*``, ``?``, ``[``; braces too).
GLOB_CHARACTERS = frozenset("*?[]{}")


def has_glob_characters(path: str) -> bool:
    """Whether fsspec would take ``path`` for a glob pattern (it holds ``*``, ``?``, ``[``, ``]``, ``{`` or ``}``)."""
    return any(c in GLOB_CHARACTERS for c in path)


def exists(fs: Any, path: str) -> bool:
    """Whether ``path`` exists, taken literally (``fs.exists`` asks for the path's info and never globs; this
    wrapper is here so callers need not know which fsspec calls are safe)."""
    return bool(fs.exists(path))


def read_bytes(fs: Any, path: str) -> bytes:
    """The bytes of the file at ``path``, taken literally (``fs.cat`` would expand ``[1]`` as a pattern).

    Raises:
        FileNotFoundError: no file at ``path``; other ``OSError``: the filesystem's read errors.
    """
    return fs.cat_file(path)


def remove(fs: Any, path: str, *, recursive: bool = False) -> int:
    """Delete the file ``path`` (or, with ``recursive``, the folder ``path`` and everything under it), taken
    literally; returns how many files were removed. A missing path removes nothing.

    fsspec's ``rm`` expands its argument as a glob pattern when it holds pattern characters: ``rm("out[1]",
    recursive=True)`` would delete ``out1`` and leave ``out[1]``. Paths without such characters keep ``rm``'s
    bulk deletes (one request per 1000 keys on S3); the others are listed with ``find`` (literal) and deleted one
    file at a time with ``rm_file``.

    Raises:
        OSError: the filesystem's delete errors (permission denied, a read-only store…).
    """
    if not fs.exists(path):
        return 0
    if not fs.isdir(path):
        fs.rm_file(path)
        return 1
    if not recursive:
        raise IsADirectoryError(f"{path} is a folder; pass recursive=True to delete it")
    files = fs.find(path)
    if not has_glob_characters(path):
        fs.rm(path, recursive=True)
        return len(files)
    for name in files:
        fs.rm_file(name)
    # local folders (and other filesystems with real directories) are left behind by rm_file: remove them deepest
    # first; object stores have no directories, and rmdir there is a no-op or not implemented
    folders = sorted(fs.find(path, withdirs=True, detail=False), key=len, reverse=True)
    for folder in [*[f for f in folders if f not in files], path]:
        with contextlib.suppress(OSError, NotImplementedError):
            fs.rmdir(folder)
    fs.invalidate_cache(path)
    return len(files)


def with_io_defaults(storage_options: dict | None, *, attempts: int, timeout_s: float | None) -> dict:
    """s3fs ``storage_options`` with clipmaps' retry and timeout defaults merged in where the user set none.

    ``config_kwargs.retries = {"max_attempts": attempts, "mode": "standard"}``: botocore retries 500/502/503/504,
    ``SlowDown`` and the other throttling codes, connection resets and timeouts, with exponential back-off and jitter;
    ``config_kwargs.connect_timeout`` / ``read_timeout`` = ``timeout_s``. s3fs retries ``SlowDown`` and dropped
    connections again on top (its class attribute ``S3FileSystem.retries``, 5 attempts; not a constructor option).
    Other filesystems ignore these keys. Never mutates its argument."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": int(attempts), "mode": "standard"})
    if timeout_s is not None:
        config.setdefault("connect_timeout", float(timeout_s))
        config.setdefault("read_timeout", float(timeout_s))
    options["config_kwargs"] = config
    return options


def atomic_put(fs: Any) -> bool:
    """Whether ``fs`` writes objects atomically (so no temporary name is needed)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)


def write_bytes(data: bytes, fs: Any, path: str) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file, the new one, or none — never a part.

    On object stores a PUT (or a completed multipart upload) is atomic, so the final key is written in place. There
    is no temporary name there on purpose: fsspec's ``mv`` on S3 is copy + delete, two requests that each may be
    retried; a task that dies between them leaves a stray temporary object, and a copy's success may be lost to a
    connection reset and the copy sent again. A single PUT has neither problem, and retrying it (botocore, Ray task
    retries) rewrites the same bytes under the same name. Elsewhere the bytes go to ``_tmp-<random>-<name>.tmp`` (a
    name no ``*.parquet`` glob and no Parquet reader picks up), renamed into place.
    """
    parent = posixpath.dirname(path)
    if not atomic_put(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}.tmp")
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)  # a rename on local and POSIX-like filesystems
        finally:
            if fs.exists(tmp):
                fs.rm_file(tmp)  # literal: rm would glob a parent folder named like a pattern
        return
    fs.pipe_file(path, data)


def write_table(table: pa.Table, fs: Any, path: str) -> None:
    """Write ``table`` as zstd Parquet to ``path`` atomically (see :func:`write_bytes`).

    A table without rows is written as a file with its schema and no row group: ``pq.write_table`` would write
    one row group of 0 rows, which Hugging Face ``datasets`` reads with a batch size of 0 and fails on
    (``ArrowInvalid: BatchSize must be greater than 0``), breaking ``load_dataset("parquet", …)`` on the whole
    folder."""
    buf = pa.BufferOutputStream()
    if table.num_rows:
        pq.write_table(table, buf, compression="zstd")
    else:
        pq.ParquetWriter(buf, table.schema, compression="zstd").close()
    write_bytes(buf.getvalue().to_pybytes(), fs, path)


# ------------------------------------------------------------------------------------------------ redaction
def is_secret_name(name: str) -> bool:
    """Whether a storage-option key or query parameter named ``name`` holds a secret: one of its words (split at
    ``_``, ``-``, ``.`` and camelCase) starts or ends with secret, token, password, passwd, credential, signature,
    auth or session, or is (or ends with) key, or is sig, sas or pwd. ``connection_string`` is one (Azure's carries
    ``AccountKey=…``); ``signature_version`` is not."""
    words = [w.lower() for w in _WORD.findall(str(name))]
    joined = "".join(words)
    if joined in _NOT_SECRET:
        return False
    if joined in _SECRET_JOINED:
        return True
    for w in words:
        if w in _SECRET_EXACT or w.endswith("key"):
            return True
        if any(w.startswith(s) or w.endswith(s) for s in _SECRET_WORDS):
            return True
    return False


def redact_uri(uri: Any) -> Any:
    """``uri`` without credentials, safe for messages, logs and error rows: the userinfo becomes ``***``
    (``s3://AKIA:se/cr+et@bucket/k`` → ``s3://***@bucket/k``; a secret may contain ``/``, ``+`` and ``@``) and so do
    the values of query parameters with secret-like names (:func:`is_secret_name`: ``X-Amz-Signature``,
    ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure ``sig``…). Strings without a scheme
    and non-strings are returned unchanged."""
    if not isinstance(uri, str):
        return uri
    m = _SCHEME.match(uri)
    if not m:
        return uri
    userinfo, rest = _split_userinfo(uri[m.end() :])
    if userinfo is not None:
        rest = f"{REDACTED}@{rest}"
    base, q, query = rest.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        items = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            items.append(f"{name}={REDACTED}" if eq and is_secret_name(unquote(name)) else item)
        rest = base + "?" + "&".join(items) + h + fragment
    return uri[: m.end()] + rest


def redact_options(options: Mapping[str, Any] | None) -> dict:
    """A copy of fsspec ``options`` with every value under a secret-like key (:func:`is_secret_name`, at any depth:
    ``secret``, ``client_kwargs.aws_session_token``…) replaced by ``***`` and the credentials of URI strings
    (``endpoint_url``…) hidden. Unset values (``None``, ``""``) stay as they are."""

    def walk(value: Any, secret: bool) -> Any:
        if secret and value not in (None, ""):
            return REDACTED
        if isinstance(value, Mapping):
            return {k: walk(v, is_secret_name(str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, False) for v in value]
        return redact_uri(value)

    return walk(dict(options or {}), False)


def redact_text(
    text: str,
    *,
    storage_options: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    uris: Iterable[Any] = (),
) -> str:
    """``text`` (an exception message, a log line) without secrets, in three passes:

    1. every secret value of ``storage_options`` (one mapping or several) and of ``uris`` (userinfo, its user and
       password parts, secret-like query values, also percent-decoded) is replaced wherever it appears — client
       libraries quote them without the scheme;
    2. every URI in the text goes through :func:`redact_uri`, and every ``user:secret@host`` without a scheme
       (botocore's ``Invalid bucket name "AKIA:secret@bucket"``) loses its ``user:secret``;
    3. ``name=value`` and quoted ``'name': 'value'`` pairs with secret-like names (``Signature=…`` of an
       ``Authorization`` header, a repr of options) have their value replaced.
    """
    text = str(text)
    for secret in sorted(secret_values(storage_options, uris), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group()), text)
    text = _USERINFO_IN_TEXT.sub(f"{REDACTED}@", text)
    text = _PAIR_IN_TEXT.sub(_hide_pair, text)
    return _QUOTED_PAIR.sub(_hide_quoted_pair, text)


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's text through :func:`redact_text`, so that libraries that log
    URLs (fsspec's HTTP filesystem at DEBUG, botocore) cannot leak presigned signatures or credentials. The CLI
    installs it on its log handlers; ``logging.getLogger().handlers[0].addFilter(RedactingFilter())`` does the
    same in a program of one's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact_text(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def _hide_pair(m: re.Match) -> str:
    secret = is_secret_name(m["name"]) and m["value"] != REDACTED
    return f"{m['name']}={REDACTED}" if secret else m.group()


def _hide_quoted_pair(m: re.Match) -> str:
    if not (is_secret_name(m["name"]) and m["value"]):
        return m.group()
    return f"{m['q']}{m['name']}{m['q']}{m['sep']}{m['v']}{REDACTED}{m['v']}"


def redact_error(
    error: BaseException,
    *,
    storage_options: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    uris: Iterable[Any] = (),
) -> BaseException:
    """An exception safe to raise on from ``error``: ``error`` itself when neither its text nor its causes' holds a
    secret (:func:`redact_text`), else one of the same type (``OSError`` when that type cannot be built from a
    message) with the redacted text. Raise the result ``from None``: tracebacks print the causes' texts, which
    Ray copies into worker logs."""
    uris = list(uris)
    texts, seen, e = [], set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    clean = [redact_text(t, storage_options=storage_options, uris=uris) for t in texts]
    if clean == texts:
        return error
    try:
        return type(error)(clean[0])
    except Exception:  # noqa: BLE001 — a type whose constructor wants more than a message (botocore's)
        return OSError(f"{type(error).__name__}: {clean[0]}")


def secret_values(
    storage_options: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None, uris: Iterable[Any] = ()
) -> set[str]:
    """The secret strings inside ``storage_options`` (values under secret-like keys; credentials of URI values) and
    inside ``uris`` (see :func:`redact_text`), each at least 6 characters long."""
    found: list[str] = []
    if isinstance(storage_options, Mapping):
        storage_options = [storage_options]

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, secret or is_secret_name(str(k)))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif isinstance(value, str):
            found.extend([value, unquote(value)] if secret else _uri_secrets(value))

    for options in storage_options or ():
        walk(options, False)
    for uri in uris:
        if isinstance(uri, str):
            found.extend(_uri_secrets(uri))
    return {s for s in found if len(s) >= _MIN_SECRET_CHARS and s != REDACTED}


def _uri_secrets(uri: str) -> list[str]:
    m = _SCHEME.match(uri)
    if not m:
        return []
    userinfo, rest = _split_userinfo(uri[m.end() :])
    out = []
    if userinfo is not None:
        user, _, password = userinfo.partition(":")
        out += [userinfo, user, password]
    for item in rest.partition("?")[2].partition("#")[0].split("&"):
        name, eq, value = item.partition("=")
        if eq and is_secret_name(unquote(name)):
            out.append(value)
    return out + [unquote(s) for s in out]


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """``(userinfo, what follows its "@")`` of a URI without its ``scheme://``, or ``(None, rest)``.

    A secret may contain ``/``, ``+`` and ``@``, so the userinfo runs to the *last* ``@`` before the query. An
    ``@`` only counts as the end of a userinfo when what precedes the first ``@`` has no ``/``, or has a ``:`` before
    its first ``/`` (``user:se/cret``); ``s3://bucket/me@example.com`` has none. A path with an ``@`` behind real
    credentials loses the part before that ``@`` too: hiding too much is the safe side.
    """
    head = rest.split("?", 1)[0]
    last = head.rfind("@")
    if last < 0:
        return None, rest
    before = head[: head.index("@")]
    if "/" in before and ":" not in before.split("/", 1)[0]:
        return None, rest
    return rest[:last], rest[last + 1 :]


__all__ = [
    "ATOMIC_PUT_PROTOCOLS",
    "DEFAULT_ALLOWED_SCHEMES",
    "GLOB_CHARACTERS",
    "OBJECT_STORE_SCHEMES",
    "REDACTED",
    "SCHEME_PATTERN",
    "TMP_PREFIX",
    "atomic_put",
    "exists",
    "filesystem",
    "has_glob_characters",
    "is_inside",
    "is_secret_name",
    "join_uri",
    "read_bytes",
    "redact_error",
    "redact_options",
    "redact_text",
    "redact_uri",
    "remove",
    "scheme_error",
    "secret_values",
    "uri_scheme",
    "uri_schemes",
    "userinfo_error",
    "with_io_defaults",
    "write_bytes",
    "write_table",
]
