"""Archives: list the members of a plain ``.tar`` or a ``.zip`` from its headers, and read one member's bytes.

Nothing is extracted to disk and archives are only ever opened for reading. Listing reads a zip's central
directory (or, when that is missing, its local headers from the start) and a tar's member headers, seeking over
the data between them. Each member remembers where its data lies, so a worker process reads exactly that range
and never more than the member declares.

The rules, applied to the name a member has after dropping empty and ``.`` components (``./a//b.jpg`` is
``a/b.jpg``, as extracting gives):

- an absolute name or one with a ``..`` component is passed over, never read;
- symbolic and hard links are passed over, never followed (a hard link's target is read under its own name);
- a name used by several members: the last one is read, as extracting would leave it; the earlier ones are
  passed over;
- directories are ignored; devices, pipes and other non-files are passed over;
- a member that declares more bytes than :func:`member_byte_limit` allows is refused before any is read.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import ImageError, first_line, os_error_reason

ARCHIVE_EXTENSIONS = {".tar": "tar", ".zip": "zip"}
"""Extensions (matched case-insensitively) of the archives whose members are read in place."""

COMPRESSED_TAR_SUFFIXES = (
    ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tb2", ".tar.xz", ".txz", ".tar.zst", ".tzst", ".tar.lz4",
    ".tar.lzma", ".tlz", ".tar.lz", ".tar.z", ".taz",
)  # fmt: skip
COMPRESSED_TAR_REASON = "a compressed tar cannot be read member by member: repack it as a plain .tar or a .zip"

MEMBER_BYTES_PER_PIXEL = 8  # 16-bit RGBA, the largest uncompressed pixel an allowed format stores
MEMBER_BYTES_SLACK = 16 * 2**20  # headers, EXIF, colour profiles and thumbnails around the pixels

_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, crc, sizes, lengths
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
TRUNCATED_MEMBER = "the archive ends inside this member (truncated archive); any later members are lost"
_SUPERSEDED = "name used again by a later member of the archive: the last one is read, as extracting would leave it"


def member_byte_limit(max_pixels: int) -> int:
    """The most bytes one archive member may declare (or hold) to be read as an image: 8 bytes for each pixel
    ``max_pixels`` allows, plus 16 MiB. Bigger members are refused unread, so a zip bomb costs nothing."""
    return MEMBER_BYTES_PER_PIXEL * max_pixels + MEMBER_BYTES_SLACK


def archive_kind(name: str) -> str | None:
    """``"tar"``, ``"zip"``, ``"compressed"`` (a compressed tar, which cannot be read in place) or None."""
    lowered = name.lower()
    if lowered.endswith(COMPRESSED_TAR_SUFFIXES):
        return "compressed"
    return ARCHIVE_EXTENSIONS.get(os.path.splitext(lowered)[1])


@dataclass(frozen=True)
class ArchiveMember:
    """Where one member's data lies in its archive: enough for a worker to read it without listing again.

    ``offset`` is the first byte of a tar member's data, or of a zip member's local header. ``size`` is the
    declared (uncompressed) size, ``stored_size`` the bytes it takes in the archive, ``method`` its zip
    compression and ``crc`` its zip checksum. ``problem``, when set, is why it cannot be read (found while
    listing); a member named ``""`` with a problem stands for damage to the archive itself.
    """

    name: str
    kind: str
    offset: int = 0
    size: int = 0
    stored_size: int = 0
    method: int = 0
    crc: int | None = None
    problem: str | None = None


@dataclass
class ArchiveListing:
    """The members of one archive: regular files with unique names, sorted by the bytes of their names; the
    members passed over as ``(name, reason)``; and ``damage``, why listing stopped early (members before the
    damage are listed)."""

    members: list[ArchiveMember] = field(default_factory=list)
    passed_over: list[tuple[str, str]] = field(default_factory=list)
    damage: str | None = None


def list_archive(path: str, kind: str) -> ArchiveListing:
    """List the ``kind`` (``"tar"`` or ``"zip"``) archive at ``path`` from its headers; never raises for its
    content: an archive that cannot be read at all is a listing with ``damage`` and no members."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return ArchiveListing(damage="empty file")
            compression = _compression(file)
            if compression is not None:
                return ArchiveListing(damage=f"{compression}-compressed data: {COMPRESSED_TAR_REASON}")
            return _list_zip(file, size) if kind == "zip" else _list_tar(file, size)
    except OSError as error:
        return ArchiveListing(damage=f"cannot read archive: {os_error_reason(error)}")


def read_member(archive: BinaryIO, member: ArchiveMember, limit: int) -> bytes:
    """The bytes of ``member`` of the open ``archive``; :class:`ImageError` if it cannot be read whole.

    Refused before reading: a member that declares more than ``limit`` bytes. Never read or inflated: more
    than the member declares. A zip member's checksum is verified."""
    if member.problem is not None:
        raise ImageError(member.problem)
    if max(member.size, member.stored_size) > limit:
        raise ImageError(
            f"archive member declares {max(member.size, member.stored_size):,} bytes, more than the limit of "
            f"{limit:,} for one image (8 bytes per pixel of --max-pixels, plus 16 MiB)"
        )
    try:
        start = _zip_data_start(archive, member) if member.kind == "zip" else member.offset
        archive.seek(start)
        raw = archive.read(member.stored_size)
    except OSError as error:
        raise ImageError(f"cannot read archive: {os_error_reason(error)}") from None
    if len(raw) < member.stored_size:
        raise ImageError("the archive ends inside this member (truncated, or changed since it was listed)")
    if member.kind == "tar":
        return raw
    return _unpacked(raw, member)


# -- tar -----------------------------------------------------------------------------------------------------


def _list_tar(file: BinaryIO, size: int) -> ArchiveListing:
    builder = _Builder()
    try:
        tar = tarfile.open(fileobj=file, mode="r:", errors="surrogateescape")
    except (tarfile.TarError, ValueError, UnicodeError) as error:
        return ArchiveListing(damage=f"not a readable tar archive ({_reason(error)})")
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, ValueError, UnicodeError) as error:
            return builder.finish(None if builder.truncated else (
                f"damaged tar archive after {builder.count} members ({_reason(error)}); "
                "members after the damage cannot be found"))
        if info is None:
            break
        builder.add_tar(info, size)
    return builder.finish(None if builder.truncated else _tar_end(file, tar.offset, builder.count))


def _tar_end(file: BinaryIO, offset: int, count: int) -> str | None:
    """Why the headers stopped at ``offset``, unless it is tar's end-of-archive marker (a block of zeros)."""
    file.seek(offset)
    block = file.read(tarfile.BLOCKSIZE)
    if block == bytes(tarfile.BLOCKSIZE):
        return None
    where = f"after {count} members"
    if not block:
        return f"truncated tar archive: it ends {where} without tar's end-of-archive marker; any later members are lost"
    if len(block) < tarfile.BLOCKSIZE:
        return f"truncated tar archive: it ends inside the header {where}; any later members are lost"
    return f"damaged tar archive: an invalid header at byte {offset:,}, {where}; members after it cannot be found"


# -- zip -----------------------------------------------------------------------------------------------------


def _list_zip(file: BinaryIO, size: int) -> ArchiveListing:
    try:
        with zipfile.ZipFile(file) as archive:  # reads the central directory only
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, UnicodeError, EOFError, struct.error) as error:
        return _scan_local_headers(file, size, _reason(error))
    builder = _Builder()
    for info, overlaps in zip(infos, _overlapping(infos)):
        unix_mode = info.external_attr >> 16 if info.create_system == 3 else 0
        if info.is_dir():
            builder.add(info.filename, directory=True)
        elif stat.S_ISLNK(unix_mode):
            builder.add(info.filename, reason="symbolic link inside the archive: not followed")
        elif stat.S_IFMT(unix_mode) not in (0, stat.S_IFREG):  # writers often leave the type bits 0
            builder.add(info.filename, reason="not a regular file")
        else:
            problem = "its data overlaps another member's (a zip bomb's trick): not read" if overlaps else None
            builder.add(info.filename, member=_zip_member(info.filename, info.header_offset, info.file_size,
                                                         info.compress_size, info.compress_type, info.CRC,
                                                         info.flag_bits, size, problem))
    return builder.finish(None)


def _overlapping(infos: list[zipfile.ZipInfo]) -> list[bool]:
    """Members whose local header and data would run into the next member's (sorted by where they start)."""
    order = sorted(range(len(infos)), key=lambda i: infos[i].header_offset)
    overlaps = [False] * len(infos)
    for first, second in zip(order, order[1:]):
        a, b = infos[first], infos[second]
        if a.header_offset + _LOCAL_HEADER.size + a.compress_size > b.header_offset:
            overlaps[first] = overlaps[second] = True
    return overlaps


def _scan_local_headers(file: BinaryIO, size: int, why: str) -> ArchiveListing:
    """Without a central directory (a cut zip), find the members from the start, one local header after another."""
    builder = _Builder()
    offset = 0
    while True:
        file.seek(offset)
        header = file.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            break
        _, _, flags, method, _, _, crc, stored, declared, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        raw_name = file.read(name_length)
        if flags & 0x08 or 0xFFFFFFFF in (stored, declared):
            break  # sizes only after the data (streamed zips) or in zip64 fields: the next header cannot be found
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "surrogateescape")
        end = offset + _LOCAL_HEADER.size + name_length + extra_length + stored
        if name.endswith("/"):
            builder.add(name, directory=True)
        else:
            builder.add(name, member=_zip_member(name, offset, declared, stored, method, crc, flags, size, None))
        if end > size:
            break
        offset = end
    return builder.finish(
        None if builder.truncated else
        f"damaged zip archive ({why}): {builder.count} members found by reading it from the start; any later are lost"
    )  # fmt: skip


def _zip_member(name: str, offset: int, declared: int, stored: int, method: int, crc: int, flags: int, size: int,
                problem: str | None) -> ArchiveMember:
    if problem is None and flags & 0x01:
        problem = "encrypted archive member: not supported"
    if problem is None and method not in _ZIP_METHODS:
        problem = f"zip compression method {method} is not supported (stored, deflate, bzip2 and lzma are)"
    if problem is None and offset + _LOCAL_HEADER.size + stored > size:
        problem = TRUNCATED_MEMBER
    return ArchiveMember(name, "zip", offset, declared, stored, method, crc, problem)


def _zip_data_start(archive: BinaryIO, member: ArchiveMember) -> int:
    archive.seek(member.offset)
    header = archive.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ImageError("damaged zip archive: no member header where its directory says this member starts")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    return member.offset + _LOCAL_HEADER.size + name_length + extra_length


def _unpacked(raw: bytes, member: ArchiveMember) -> bytes:
    """Inflate a zip member's data, never to more than one byte past its declared size, and check it."""
    limit = member.size + 1
    try:
        if member.method == zipfile.ZIP_STORED:
            data = raw
        elif member.method == zipfile.ZIP_DEFLATED:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, limit)
        elif member.method == zipfile.ZIP_BZIP2:
            data = bz2.BZ2Decompressor().decompress(raw, max_length=limit)
        else:
            data = _lzma_unpacked(raw, limit)
    except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError, struct.error) as error:
        raise ImageError(f"damaged archive member: cannot decompress its data ({_reason(error)})") from None
    if len(data) > member.size:
        raise ImageError(f"archive member holds more data than the {member.size:,} bytes it declares "
                         "(damaged, or a zip bomb): not read further")
    if len(data) < member.size:
        raise ImageError(f"archive member holds less data than the {member.size:,} bytes it declares (damaged)")
    if member.crc is not None and zlib.crc32(data) != member.crc:
        raise ImageError("damaged archive member: its data does not match its checksum (CRC-32)")
    return data


def _lzma_unpacked(raw: bytes, limit: int) -> bytes:
    # zip's LZMA: 2 bytes of version, 2 of properties' length, the 5 properties, then a raw LZMA1 stream. The
    # properties are those of the .lzma ("alone") header, which adds the size (unknown: an end marker follows).
    (properties_length,) = struct.unpack("<H", raw[2:4])
    properties, stream = raw[4 : 4 + properties_length], raw[4 + properties_length :]
    alone = properties + b"\xff" * 8 + stream
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(alone, max_length=limit)


# -- both ----------------------------------------------------------------------------------------------------


def _compression(file: BinaryIO) -> str | None:
    file.seek(0)
    head = file.read(8)
    file.seek(0)
    return next((name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def _reason(error: BaseException) -> str:
    return first_line(error, type(error).__name__)


def clean_member_name(name: str) -> tuple[str, str | None]:
    """``(name without empty and "." components, None)``, or ``(name, reason)`` for a name never to be read."""
    if name.startswith("/"):
        return name, "absolute path inside the archive: not read"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return name, "path with '..' inside the archive: not read"
    return "/".join(parts), None


class _Builder:
    """Collects one archive's entries in archive order and applies the rules of the module docstring."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, ArchiveMember | None, str | None]] = []  # (name, member, reason)
        self._latest: dict[str, int] = {}
        self.passed_over: list[tuple[str, str]] = []
        self.count = 0  # every member seen, directories too
        self.truncated = False  # the last member runs past the end of the archive (and says so)

    def add(self, raw_name: str, *, member: ArchiveMember | None = None, reason: str | None = None,
            directory: bool = False) -> None:
        self.count += 1
        name, unsafe = clean_member_name(raw_name)
        if unsafe is not None:
            self.passed_over.append((raw_name, unsafe))
            return
        if not name or directory:
            return
        previous = self._latest.get(name)
        if previous is not None:
            self._entries[previous] = (name, None, _SUPERSEDED)
        self._latest[name] = len(self._entries)
        self._entries.append((name, member, reason))
        if member is not None and member.problem == TRUNCATED_MEMBER:
            self.truncated = True

    def add_tar(self, info: tarfile.TarInfo, size: int) -> None:
        if info.isdir():
            self.add(info.name, directory=True)
        elif info.issym():
            self.add(info.name, reason=f"symbolic link inside the archive (to {info.linkname}): not followed")
        elif info.islnk():
            self.add(info.name, reason=f"hard link inside the archive (to {info.linkname}): not followed; "
                                       "its target is read under its own name")
        elif not info.isreg():
            self.add(info.name, reason="not a regular file")
        else:
            problem = None
            if info.issparse():
                problem = "sparse tar member: not supported"
            elif info.offset_data + info.size > size:
                problem = TRUNCATED_MEMBER
            self.add(info.name, member=ArchiveMember(info.name, "tar", info.offset_data, info.size, info.size,
                                                      problem=problem))

    def finish(self, damage: str | None) -> ArchiveListing:
        members = [dataclasses.replace(member, name=name) for name, member, _ in self._entries if member is not None]
        passed = self.passed_over + [(name, reason) for name, member, reason in self._entries if member is None]
        members.sort(key=lambda member: os.fsencode(member.name))
        return ArchiveListing(members=members, passed_over=passed, damage=damage)
