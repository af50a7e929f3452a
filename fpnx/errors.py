"""Errors meant for people: one line, naming the file and the reason.

The CLI prints ``str(error)`` and exits with ``error.exit_code``; it never shows a traceback for these. The
helpers below turn other exceptions and paths into text fit for such a line.
"""

from __future__ import annotations

import os
import signal


class FpnxError(Exception):
    """Base class of every error fpnx raises on purpose."""

    exit_code = 1


class UsageError(FpnxError):
    """The user asked for something impossible: a missing input, an unknown level, a bad size."""

    exit_code = 2


class WeightsError(FpnxError):
    """A checkpoint cannot be found, downloaded, trusted or mapped onto the network."""

    exit_code = 2


class DownloadError(WeightsError):
    """Named weights could not be downloaded, or the file differs from the published one: the run could not
    complete (exit 1), though nothing on the command line was wrong."""

    exit_code = 1


class ImageError(FpnxError):
    """One image could not be decoded; a run records it and goes on."""


class StoreError(FpnxError):
    """A feature file is missing, corrupt, locked, or was made with other settings."""


class MissingFileError(StoreError, FileNotFoundError):
    """The feature file asked for does not exist: a usage error (exit 2), like a missing input of ``extract``; also a
    ``FileNotFoundError``, so ``except FileNotFoundError`` around ``open_features`` catches it as users expect."""

    exit_code = 2


class BenchError(FpnxError):
    """A benchmark could not run as asked (e.g. ``torch.compile`` failed)."""


class RankFailed(FpnxError):
    """Another rank of a torchrun launch failed; this one stops with it."""


class Interrupted(FpnxError):
    """Ctrl-C or SIGTERM: finished work is kept; the message says how to resume.

    ``exit_code`` is 128 + the signal's number, as a shell reports a process stopped by it: 130 for Ctrl-C
    (SIGINT), 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message, or ``default`` (its type's name) when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (default or type(error).__name__)


def os_error_reason(error: OSError) -> str:
    """"no such file or directory": an OSError's reason in the middle of a sentence."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def display_path(path: str) -> str:
    """``path`` made safe for a one-line message: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
