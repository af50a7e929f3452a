"""The settings a resumed or merged store must share, and the one message naming the first that differs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .schema import Layout, normalize


LEVEL_KEYS = ("levels", "channels", "strides")  # layout settings that follow from the chosen levels


def full_settings(settings: Mapping[str, Any], layout: Layout) -> dict[str, Any]:
    """The caller's settings plus the storage layout, JSON-normalised.

    ValueError if the caller's settings name a layout key (``dtype``, ``levels``...) with another value than
    the writer's own argument: the file would claim one thing and hold another.
    """
    combined = normalize(dict(settings))
    for key, value in normalize(layout.to_settings()).items():
        if key in combined and combined[key] != value:
            raise ValueError(f"settings[{key!r}] is {combined[key]!r} but the writer's {key} is {value!r}")
        combined[key] = value
    return combined


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first setting that differs, in sorted key order; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            inner = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return inner, old.get(key, "(absent)"), new.get(key, "(absent)")
            found = first_difference(old[key], new[key], inner)
            if found:
                return found
        return None
    return None if old == new else (path or "(all settings)", old, new)


def check_settings(where: Path, found: Mapping[str, Any], expected: Mapping[str, Any], *, expected_in: str,
                   advice: str = "") -> None:
    """The one refusal of a store made with other settings (resume, merge, shards): StoreError naming the first
    difference between ``where``'s settings (``found``) and ``expected``, which belong to ``expected_in``."""
    difference = first_difference(dict(found), dict(expected))
    if difference:
        key, there, wanted = difference
        if key.split(".")[0] in LEVEL_KEYS:  # the levels decide these: say so in the option's words
            key, there, wanted = "levels", found.get("levels", there), expected.get("levels", wanted)
        raise StoreError(
            f"{where} was made with other settings: {key!r} is {there!r} there, {wanted!r} {expected_in}{advice}"
        )
