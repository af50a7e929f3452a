"""Discovery: turn command-line inputs (files, folders, ``@list.txt``, archives) into a deterministic list of images.

Defensive because image folders are full of surprises: hidden files, AppleDouble files, link loops, pipes,
two paths to one file, archives. Each image gets the name its features are stored under (its ``source``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError, display_path, os_error_reason
from .archives import ARCHIVE_EXTENSIONS, COMPRESSED_TAR_REASON, ArchiveMember, archive_kind, list_archive

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm",
    ".avif", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".heic", ".heif", ".hif",
)  # fmt: skip
"""File extensions (lower-case; matched case-insensitively) that :func:`discover` treats as images.

``.ppm/.pgm/.pbm`` are included: Pillow reads binary 8/16-bit files with its C raw decoder and the plain
(text) and odd-maxval variants with small bounds-checked Python decoders (slow on huge files, not unsafe).
``.heic/.heif/.hif`` are images even without the optional HEIF support: decoding then fails with a reason
that names it."""


@dataclass(frozen=True)
class ImageSource:
    """One image to process.

    ``path`` is what to open (an ``os.fsdecode`` string, so non-UTF-8 bytes survive as surrogate escapes).
    ``source`` is the name recorded in the output: relative to the folder the file was found in, with ``/``
    separators; a file given directly keeps exactly the text given; a ``@list.txt`` entry keeps its text
    as written in the list. For a member of an archive, ``path`` is the archive, ``member`` says where the
    member lies in it, and ``source`` is ``ARCHIVE/MEMBER`` (the archive's own source, then the member's
    name). Decode any of them with :func:`fpnx.sources.decode_source`.
    """

    path: str
    source: str
    member: ArchiveMember | None = None


@dataclass
class Discovery:
    """What :func:`discover` found: the images in order, and ``(path, reason)`` for each path passed over.

    Paths are ``os.fsdecode`` strings and may hold surrogate escapes; show them with :func:`display_path`.
    """

    images: list[ImageSource] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def discover(inputs: Sequence[str | bytes | os.PathLike[Any]], *, archives: bool = True) -> Discovery:
    """Expand files, folders, ``@list.txt`` and archive inputs into images, in a deterministic order.

    - A **file** is used as given (even if hidden); it must have an extension in :data:`IMAGE_EXTENSIONS`
      or be an archive, else :class:`UsageError`. Its ``source`` is exactly the text given.
    - An **archive** (``.tar`` or ``.zip``) is listed from its headers (:mod:`fpnx.sources.archives`, whose
      docstring has the rules for links, unsafe or repeated names and damage) and its members are used as
      the files of a folder would be: sorted by the bytes of their names, hidden and AppleDouble members and
      members without an image extension skipped (archives inside archives are not opened). A member's
      ``source`` is the archive's ``source``, ``/``, the member's name. An archive that is damaged or cannot
      be read gives its readable members plus one entry for the archive itself whose decoding fails with
      the reason, so the run records it. Compressed tars (``.tar.gz``...) cannot be read in place: a
      :class:`UsageError` when given directly, such an entry when found in a folder.
      ``archives=False`` (``--no-archives``) skips archives found in folders; given ones are still read.
    - A **folder** is walked recursively, following symbolic links to folders. A folder is walked at most
      once (tracked by its real identity), so link loops end and two links to one folder do not duplicate
      it. Its images come sorted by the bytes of their path relative to the folder, which is also their
      ``source`` (``/``-separated).
    - ``@list.txt`` (a ``str`` input starting with ``@``) reads one path per line; blank lines and lines
      starting with ``#`` are ignored, surrounding whitespace is stripped, relative paths are relative to
      the list's folder. Each entry is a file or folder as above (lists do not nest); ``source`` is the
      entry as written. Write ``./@name`` for a real file whose name starts with ``@``.

    Inputs may be mixed; results keep the input order. Every real file (same device and inode, so also
    hard links) is listed at most once: the first time it is reached.

    Passed over and reported in ``skipped`` as ``(path, reason)``: inside folders, hidden files and
    folders (name starting with ``.``; a hidden folder is not entered), AppleDouble ``._*`` files (macOS
    metadata, not images), files without an image extension, non-regular files (pipes, sockets, devices),
    broken symbolic links and unreadable folders; anywhere, a folder already walked and a second path to a
    file already listed; inside archives, the members passed over by the archive rules (reported as
    ``ARCHIVE_PATH/MEMBER``).

    Raises :class:`UsageError` (one line naming the path) for a missing input or list entry, a missing or
    unreadable list, a file given directly without an image or archive extension, a compressed tar given
    directly, and two different files (or members) that would be stored under the same ``source``. A folder
    without images is not an error, and neither is a damaged archive (its members fail, one by one).
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise TypeError("discover() takes a sequence of inputs, not a single path")
    collector = _Collector(archives)
    for item in inputs:
        if isinstance(item, str) and item.startswith("@"):
            collector.add_list(item[1:])
        else:
            text = os.fsdecode(item)
            collector.add_input(text, source=text, where="")
    collector.check_unique_sources()
    return Discovery(images=collector.images, skipped=collector.skipped)


def locate_image(path: str) -> ImageSource | None:
    """The image at ``path``: a file, or ``ARCHIVE/MEMBER`` inside a ``.tar``/``.zip``; None when there is none.

    For tools that find an image again from its stored source (the plot of ``fpnx inspect``)."""
    if os.path.isfile(path):
        return ImageSource(path, path)
    head, name = path, ""
    while True:
        head, tail = os.path.split(head)
        if not tail or not head:
            return None
        name = f"{tail}/{name}" if name else tail
        kind = archive_kind(head)
        if kind in ("tar", "zip") and os.path.isfile(head):
            member = next((item for item in list_archive(head, kind).members if item.name == name), None)
            return None if member is None else ImageSource(head, path, member)


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _member_skip_reason(name: str) -> str | None:
    """Why an archive member is not an image, by the rules for files in folders; None for an image."""
    *folders, base = name.split("/")
    if any(folder.startswith(".") for folder in folders):
        return "in a hidden folder"
    if base.startswith("._"):
        return "AppleDouble metadata file (macOS), not an image"
    if base.startswith("."):
        return "hidden"
    if _has_image_extension(base):
        return None
    return "an archive inside an archive is not opened" if archive_kind(base) else "not an image file extension"


def _file_key(path: str, info: os.stat_result) -> tuple[Any, ...]:
    # Device + inode names a real file without resolving every path component; some filesystems report
    # inode 0 for everything, and there the resolved path has to do.
    if info.st_ino:
        return (info.st_dev, info.st_ino)
    return ("realpath", os.path.realpath(path))



class _Collector:
    """Accumulates images and skips across all inputs, remembering what was already seen."""

    def __init__(self, archives: bool = True) -> None:
        self.archives = archives
        self.images: list[ImageSource] = []
        self.skipped: list[tuple[str, str]] = []
        self._source_of_file: dict[tuple[Any, ...], str] = {}
        self._walked_folders: set[tuple[Any, ...]] = set()

    def add_list(self, list_path: str) -> None:
        try:
            with open(list_path, "rb") as list_file:
                content = list_file.read()
        except FileNotFoundError:
            raise UsageError(f"{display_path(list_path)}: no such file or directory") from None
        except OSError as error:
            reason = os_error_reason(error)
            raise UsageError(f"{display_path(list_path)}: cannot read list of images: {reason}") from None
        content = content.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark from Windows editors
        base = os.path.dirname(list_path)
        for number, raw_line in enumerate(content.split(b"\n"), start=1):
            entry = os.fsdecode(raw_line.strip())
            if not entry or entry.startswith("#"):
                continue
            where = f" (line {number} of {display_path(list_path)})"
            self.add_input(os.path.join(base, entry), source=entry, where=where)

    def add_input(self, path: str, *, source: str, where: str) -> None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"{display_path(path)}: no such file or directory{where}") from None
        except OSError as error:
            reason = os_error_reason(error)
            raise UsageError(f"{display_path(path)}: {reason}{where}") from None
        kind = archive_kind(path)
        if stat.S_ISDIR(info.st_mode):
            self._walk(path, info)
        elif not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{display_path(path)}: not a regular file or folder{where}")
        elif kind == "compressed":
            raise UsageError(f"{display_path(path)}: {COMPRESSED_TAR_REASON}{where}")
        elif kind is None and not _has_image_extension(path):
            expected = " ".join(IMAGE_EXTENSIONS + tuple(ARCHIVE_EXTENSIONS))
            raise UsageError(f"{display_path(path)}: not an image file or archive (extension not one of {expected}){where}")
        else:
            self._add_file(path, source, info)

    def _add_file(self, path: str, source: str, info: os.stat_result) -> None:
        key = _file_key(path, info)
        first_source = self._source_of_file.get(key)
        if first_source is not None:
            self.skipped.append((path, f"same file as {display_path(first_source)}"))
            return
        self._source_of_file[key] = source
        kind = archive_kind(path)
        if kind is None:
            self.images.append(ImageSource(path=path, source=source))
        elif kind == "compressed":
            self.images.append(ImageSource(path, source, ArchiveMember("", kind, problem=COMPRESSED_TAR_REASON)))
        else:
            self._add_members(path, source, kind)

    def _add_members(self, path: str, source: str, kind: str) -> None:
        listing = list_archive(path, kind)
        self.skipped.extend((f"{path}/{name}", reason) for name, reason in listing.passed_over)
        for member in listing.members:
            reason = _member_skip_reason(member.name)
            if reason is None:
                self.images.append(ImageSource(path, f"{source}/{member.name}", member))
            else:
                self.skipped.append((f"{path}/{member.name}", reason))
        if listing.damage is not None:  # recorded as the archive's failure when the run decodes it
            self.images.append(ImageSource(path, source, ArchiveMember("", kind, problem=listing.damage)))

    def _walk(self, root: str, root_info: os.stat_result) -> None:
        root_key = _file_key(root, root_info)
        if root_key in self._walked_folders:
            self.skipped.append((root, "folder already walked"))
            return
        self._walked_folders.add(root_key)
        found: list[tuple[str, str, os.stat_result]] = []
        pending = [(root, "")]  # (folder path, its source prefix); an explicit stack: trees can be deep
        while pending:
            folder, prefix = pending.pop()
            subfolders = self._scan_folder(folder, prefix, found)
            pending.extend(reversed(subfolders))  # depth first, in sorted order
        # an archive sorts where its members' sources would: after "a.tar.jpg" ('.' < '/'), before "a.tar0.jpg"
        found.sort(key=lambda item: os.fsencode(item[1] + ("/" if archive_kind(item[1]) else "")))
        for path, source, info in found:
            self._add_file(path, source, info)

    def _scan_folder(
        self, folder: str, prefix: str, found: list[tuple[str, str, os.stat_result]]
    ) -> list[tuple[str, str]]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
        except OSError as error:
            self.skipped.append((folder, f"cannot read folder: {os_error_reason(error)}"))
            return []
        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            name, path = entry.name, entry.path
            if name.startswith("._"):
                self.skipped.append((path, "AppleDouble metadata file (macOS), not an image"))
                continue
            if name.startswith("."):
                self.skipped.append((path, "hidden"))
                continue
            try:
                info = entry.stat()  # follows symbolic links
            except OSError as error:
                reason = "broken symbolic link" if entry.is_symlink() else os_error_reason(error)
                self.skipped.append((path, reason))
                continue
            if stat.S_ISDIR(info.st_mode):
                key = _file_key(path, info)
                if key in self._walked_folders:
                    self.skipped.append((path, "folder already walked (symbolic link loop or second link)"))
                else:
                    self._walked_folders.add(key)
                    subfolders.append((path, prefix + name + "/"))
            elif not stat.S_ISREG(info.st_mode):
                self.skipped.append((path, "not a regular file"))
            elif archive_kind(name) and not self.archives:
                self.skipped.append((path, "archive: not opened (--no-archives)"))
            elif not _has_image_extension(name) and not archive_kind(name):
                self.skipped.append((path, "not an image file extension"))
            else:
                found.append((path, prefix + name, info))
        return subfolders

    def check_unique_sources(self) -> None:
        path_of_source: dict[str, str] = {}
        for image in self.images:
            where = image.path if image.member is None else f"{image.path}/{image.member.name}"
            other = path_of_source.setdefault(image.source, where)
            if other != where:
                raise UsageError(
                    f"two different files would both be stored as {display_path(image.source)}: "
                    f"{display_path(other)} and {display_path(where)}; rename one or give their common folder"
                )

