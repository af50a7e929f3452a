"""Errors meant for people: one line, naming the file and the reason.

The CLI prints ``str(error)`` and exits with ``error.exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations


class FpnxError(Exception):
    """Base class of every error fpnx raises on purpose."""

    exit_code = 1


class UsageError(FpnxError):
    """The user asked for something impossible: a missing input, an unknown level, a bad size."""

    exit_code = 2


class WeightsError(FpnxError):
    """A checkpoint cannot be found, downloaded, trusted or mapped onto the network."""

    exit_code = 2


class ImageError(FpnxError):
    """One image could not be decoded; a run records it and goes on."""


class StoreError(FpnxError):
    """A feature file is missing, corrupt, locked, or was made with other settings."""
