"""JPEG marker structure as DALI's parser needs it: found and repaired before DALI sees the file.

DALI 2.4's decoder (nvImageCodec's JPEG parser) rejects some JPEGs that Pillow and libjpeg read
without complaint: between SOI and the first scan (SOS) it wants every byte to belong to a marker
segment, so it raises on an APPn/COM segment whose length field is 0 or 1 (shorter than the
length field itself), on `FF 00` (a stuffed byte) or an RST / TEM marker where a segment belongs,
and on junk between segments. Measured on the CPU decoder, worse than a refusal: after such an
error in a batch of 32 or more images, DALI 2.4 can crash the process (SIGSEGV) when the failed
pipeline is destroyed or the next one is built, so these files must never reach a DALI pipeline.

`header_problem(path)` walks the marker segments up to SOS, reading only the header (usually a few
KB: seeks over segment bodies); `repaired(path)` returns the file's bytes with the offending bytes
dropped, which is what Pillow/libjpeg effectively do (they skip a too-short segment's length field
and the stray marker bytes and go on), so the pixels are the same. The DALI loader screens every
JPEG with `header_problem` when it is built (threads; the cost is in docs/INTERNALS.md) and reads a
repaired copy of each file it flags (see bad_files.py).
"""
from __future__ import annotations

_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM, RST0-7: no length field
_MAX_HEADER = 1 << 22  # stop looking for SOS after 4 MiB of segments (huge EXIF/ICC): assume fine


def _walk(read_at, size: int):
    """(problem, kept byte ranges) of the segments before SOS; read_at(offset, n) -> bytes."""
    problems: list[str] = []
    keep: list[tuple[int, int]] = [(0, 2)]
    pos = 2
    while pos < min(size, _MAX_HEADER):
        head = read_at(pos, 4)
        if len(head) < 2:
            break
        if head[0] != 0xFF:
            start = pos  # junk where a marker belongs: skip to the next FF
            while pos < size and read_at(pos, 1) not in (b"\xff", b""):
                pos += 1
            problems.append(f"{pos - start} stray byte(s) at offset {start}")
            continue
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker: allowed
            pos += 1
            continue
        if marker == 0x00 or marker in _STANDALONE:
            problems.append(f"{'FF 00' if marker == 0 else f'marker FF {marker:02X}'} in the header at offset {pos}")
            pos += 2
            continue
        if marker == 0xD9 or marker == 0xD8:
            problems.append(f"marker FF {marker:02X} before the image data")
            return problems, None  # not repairable by dropping bytes
        if len(head) < 4:
            break
        length = int.from_bytes(head[2:4], "big")
        if length < 2:
            problems.append(f"segment FF {marker:02X} with length {length} at offset {pos}")
            pos += 4
            continue
        keep.append((pos, pos + 2 + length))
        if marker == 0xDA:  # start of scan: the rest is image data, untouched
            keep[-1] = (pos, size)
            return problems, keep
        pos += 2 + length
    keep.append((pos, size))
    return problems, keep


def _reader(f):
    def read_at(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)
    return read_at


def header_problem(path: str) -> str | None:
    """Why DALI's JPEG parser would reject this file's header, or None (also for non-JPEG files
    and files that cannot be read: the other checks name those)."""
    try:
        with open(path, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":
                return None
            f.seek(0, 2)
            size = f.tell()
            problems, _ = _walk(_reader(f), size)
    except OSError:
        return None
    return "; ".join(problems[:2]) + ("; ..." if len(problems) > 2 else "") if problems else None


def repaired(path: str) -> bytes | None:
    """The file's bytes without the stray header bytes `header_problem` found, or None when
    dropping bytes cannot fix it (a second SOI, EOI before the image data)."""
    with open(path, "rb") as f:
        data = f.read()
    problems, keep = _walk(lambda o, n: data[o:o + n], len(data))
    if keep is None:
        return None
    return b"".join(data[a:b] for a, b in keep)
