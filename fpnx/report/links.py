"""Links inside an HDF5 file (soft, external, virtual or external-storage datasets): listed, never followed.

The reader refuses them; :func:`find_links` only looks at link records, so ``fpnx inspect`` can say what a
suspicious file points to without opening anything it points to.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..store.chunks import external_storage
from ..store.parts import refers_to_own_data_file
from ..store.storefile import open_read_only

# At most this many links are listed (a count of the rest follows).
MAX_LINKS = 50


@dataclass
class LinkInfo:
    """A link record or dataset in the file that points outside its own data; listed, never followed."""

    path: str  # where in the file, e.g. /images/source
    kind: str  # soft link, external link, user-defined link, virtual dataset, external storage
    target: str


def links_of(path: Path) -> list[LinkInfo]:
    """The links of the file, or of every committed segment of a .parts folder."""
    if path.is_dir():
        files = sorted(path.glob("seg-*.h5"))
    else:
        files = [path]
    found: list[LinkInfo] = []
    for file in files:
        for link in find_links(file):
            if path.is_dir():
                link = dataclasses.replace(link, path=f"{file.name}:{link.path}")
            found.append(link)
    if len(found) > MAX_LINKS:
        extra = len(found) - MAX_LINKS
        found = found[:MAX_LINKS] + [LinkInfo("...", "more", f"{extra} more not listed")]
    return found


def find_links(path: str | os.PathLike[str]) -> list[LinkInfo]:
    """Every soft, external or user-defined link and every virtual or external-storage dataset in an HDF5 file.

    Only link records are read: no link is followed, no external file is opened. Hard links are walked
    (each group once). A file that HDF5 cannot open gives an empty list (the reader reports why).
    """
    try:
        h5 = open_read_only(Path(path))
    except (OSError, ValueError):
        return []
    found: list[LinkInfo] = []
    seen: set[int] = set()

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            where = f"{prefix}/{name}"
            try:
                link = group.get(name, getlink=True)
            except (KeyError, OSError, ValueError):
                continue
            if isinstance(link, h5py.SoftLink):
                found.append(LinkInfo(where, "soft link", link.path))
            elif isinstance(link, h5py.ExternalLink):
                found.append(LinkInfo(where, "external link", f"{link.filename}:{link.path}"))
            elif isinstance(link, h5py.HardLink):
                try:
                    obj = group[name]
                except (KeyError, OSError, ValueError):
                    continue
                if isinstance(obj, h5py.Group):
                    address = h5py.h5o.get_info(obj.id).addr
                    if address not in seen:
                        seen.add(address)
                        walk(obj, where)
                elif isinstance(obj, h5py.Dataset):
                    if obj.is_virtual:
                        targets = sorted({source.file_name for source in obj.virtual_sources()})
                        found.append(LinkInfo(where, "virtual dataset", ", ".join(targets)))
                    elif names := {name for name, _, _ in external_storage(obj)}:
                        if not refers_to_own_data_file(Path(path), names):  # a run's own: read, not a link
                            targets = ", ".join(sorted(map(os.fsdecode, names)))
                            found.append(LinkInfo(where, "external storage", targets))
            else:
                found.append(LinkInfo(where, "user-defined link", type(link).__name__))

    try:
        seen.add(h5py.h5o.get_info(h5.id).addr)
        walk(h5, "")
    except (OSError, KeyError, ValueError, RuntimeError):
        pass  # a damaged file: the reader names the damage
    finally:
        h5.close()
    return found
