"""The one error family of clipmaps: every error raised on purpose, from spec loading to the sink.

Two kinds of failure, one base class:

* **Job errors** stop the run and map to the CLI's documented exit codes (:attr:`ClipmapsError.exit_code`):
  :class:`ConfigError` (2: the spec, the manifest as a whole, the model or the output refuse this job; the message
  names the field), :class:`JobFailed` (4: a stage failed for good; what is finished is kept and a re-run resumes).
  An error fraction above ``run.max_error_fraction`` is exit 3 (a finished run, not an exception).
* **Row errors** (:class:`RowError`) never stop the job: a bad image, mask or prompt becomes a row of ``errors/``
  (``schemas.datasets.ERRORS``) carried between stages in the structured columns of ``schemas.batches``
  (``error_stage``, ``error_type``, ``error_message`` before the methods; ``{method}__error_*`` after).

Imports nothing outside the standard library (the driver, the workers and the CLI all use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Stages an error row names (``errors/`` column ``stage``), in pipeline order.
STAGES = ("manifest", "read", "decode", "mask", "preprocess", "text", "model", "write")

MESSAGE_CHARS = 500


def short(text: object, limit: int = MESSAGE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters (an ellipsis marks a cut)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class ClipmapsError(Exception):
    """Base of every error clipmaps raises on purpose.

    Attributes:
        stage: where it happened (one of :data:`STAGES`, or ``"job"`` for errors about the whole job).
        error_type: a short CamelCase name (``errors/`` column ``error_type``); the class name by default.
        message: what is wrong, naming the input or field (secrets already redacted by the raiser).
        region_id: the mask the error is about, if any.
    """

    exit_code: int = 1
    default_stage: str = "job"

    def __init__(
        self, message: str, *, stage: str | None = None, error_type: str | None = None, region_id: str | None = None
    ):
        self.message = str(message)
        self.stage = stage or self.default_stage
        self.error_type = error_type or type(self).__name__
        self.region_id = region_id
        super().__init__(self.message)

    def __reduce__(self):  # Ray pickles errors raised in workers
        return _rebuild, (type(self), self.message, self.stage, self.error_type, self.region_id)

    def record(self, *, image_id: str | None = None, uri: str | None = None, method: str | None = None) -> dict:
        """This error as one ``errors/`` row (``schemas.datasets.ERRORS``)."""
        return error_record(
            image_id=image_id,
            uri=uri,
            method=method,
            region_id=self.region_id,
            stage=self.stage,
            error_type=self.error_type,
            message=self.message,
        )


def _rebuild(cls, message, stage, error_type, region_id):
    err = cls.__new__(cls)
    ClipmapsError.__init__(err, message, stage=stage, error_type=error_type, region_id=region_id)
    return err


class ConfigError(ClipmapsError, ValueError):
    """The job cannot run as configured (spec, manifest as a whole, model, output). CLI exit code 2; re-running the
    same command can never succeed, so the CLI never advises it."""

    exit_code = 2
    default_stage = "spec"


class SpecError(ConfigError):
    """One or more problems in a job spec. ``str(e)`` lists each as ``"<field path>: <reason>"``.

    Attributes:
        problems: ``[(path, reason)]``, every problem found (not only the first); ``path`` is a tuple of keys, list
            items as ``"[i]"``; empty for the whole spec.
        path, reason: those of the first problem.
    """

    def __init__(self, path: str | Sequence[str] | None = None, reason: str = "", *, problems=None):
        if problems is None:
            problems = [(_as_path(path), reason)]
        self.problems: list[tuple[tuple[str, ...], str]] = [(_as_path(p), str(r)) for p, r in problems]
        self.path, self.reason = self.problems[0]
        text = "\n".join(_line(p, r) for p, r in self.problems)
        if len(self.problems) > 1:
            text = f"{len(self.problems)} problems in the job spec:\n" + "\n".join(
                "  " + _line(p, r) for p, r in self.problems
            )
        super().__init__(text, error_type="SpecError")

    def __reduce__(self):
        return _rebuild_spec, (self.problems,)

    @property
    def field(self) -> str:
        """The dotted path of the (first) bad field, e.g. ``methods.gem.depth`` or ``vocabulary.names[2]``."""
        return format_path(self.path)

    @property
    def fields(self) -> list[str]:
        """The dotted paths of every problem, in order."""
        return [format_path(p) for p, _ in self.problems]

    def within(self, *prefix: str) -> SpecError:
        """The same problems with ``prefix`` prepended to each path."""
        return SpecError(problems=[((*prefix, *p), r) for p, r in self.problems])


def _rebuild_spec(problems):
    return SpecError(problems=problems)


class ManifestError(ConfigError):
    """The manifest as a whole cannot be used (unreadable, unknown format, missing columns, empty)."""

    default_stage = "manifest"


class OutputConflict(ConfigError):
    """The output URI holds results this job must not add to (other settings, changed rows, foreign files)."""

    default_stage = "output"


class JobFailed(ClipmapsError, RuntimeError):
    """The run stopped before every shard was written (a stage failed for good, or nothing progressed for
    ``run.stall_timeout_s``). What was finished is kept: re-running the same job resumes it. CLI exit code 4."""

    exit_code = 4


class RowError(ClipmapsError):
    """One input (image, mask, prompt) that cannot be processed; it becomes an ``errors/`` row, the job goes on."""

    default_stage = "read"

    def __init__(self, stage: str, error_type: str, message: str, *, region_id: str | None = None):
        super().__init__(short(message), stage=stage, error_type=error_type, region_id=region_id)


def error_record(
    *,
    image_id: Any = None,
    uri: Any = None,
    method: str | None = None,
    region_id: Any = None,
    stage: str,
    error_type: str | None,
    message: str | None,
) -> dict:
    """One ``errors/`` row as a dict (``schemas.datasets.ERRORS``): ids as strings, empty type/message filled."""
    return {
        "image_id": None if image_id is None else str(image_id),
        "uri": None if uri is None else str(uri),
        "method": method,
        "region_id": None if region_id is None else str(region_id),
        "stage": str(stage),
        "error_type": str(error_type or "Error"),
        "message": str(message or ""),
    }


def format_path(path: Sequence[str]) -> str:
    """``("methods", "gem", "depth")`` → ``methods.gem.depth``; list items as ``names[2]``."""
    out = ""
    for p in path:
        p = str(p)
        out += p if p.startswith("[") or not out else "." + p
    return out


def _as_path(path: str | Sequence[str] | None) -> tuple[str, ...]:
    if path is None:
        return ()
    if isinstance(path, str):
        return tuple(p for p in path.split(".") if p)
    return tuple(str(p) for p in path)


def _line(path: tuple[str, ...], reason: str) -> str:
    return f"{format_path(path)}: {reason}" if path else reason
