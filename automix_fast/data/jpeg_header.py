"""JPEG marker structure as DALI's parser needs it: found and repaired before DALI sees the file.

DALI 2.4's decoder (nvImageCodec's JPEG parser) rejects some JPEGs that Pillow and libjpeg read
without complaint: between SOI and the first scan (SOS) it wants every byte to belong to a marker
segment, so it raises on an APPn/COM segment whose length field is 0 or 1 (shorter than the
length field itself), on `FF 00` (a stuffed byte) or an RST / TEM marker where a segment belongs,
and on junk between segments. Measured on the CPU decoder, worse than a refusal: after such an
error in a batch of 32 or more images, DALI 2.4 can crash the process (SIGSEGV) when the failed
pipeline is destroyed or the next one is built, so these files must never reach a DALI pipeline.

`header_problem(path)` walks the marker segments up to SOS, reading only the header (usually a few
KB: seeks over segment bodies) and checking the frame, scan and table segments the way decoders
do (sizes, component ids, table numbers and lengths). For the known oddities (APPn length 0/1,
`FF 00`, RST/TEM before SOS) `repaired(path)` returns the file's bytes with the offending bytes
dropped, which is what Pillow/libjpeg effectively do (they skip a too-short segment's length
field and the stray marker bytes and go on), so the pixels are the same; any other damage is
not repairable by dropping bytes (None), and such a file is decoded with Pillow or left out. The DALI loader screens every
JPEG with `header_problem` when it is built (threads; the cost is in docs/INTERNALS.md) and reads a
repaired copy of each file it flags (see bad_files.py).
"""
from __future__ import annotations

import os

_STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM, RST0-7: no length field
_MAX_HEADER = 1 << 22  # stop looking for SOS after 4 MiB of segments (huge EXIF/ICC): assume fine


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _segment_problem(marker: int, body: bytes, frame: dict) -> str | None:
    """What is inconsistent inside a frame/scan/table segment (what the decoders check before
    decoding); `frame` collects the SOF's component ids for the SOS check."""
    if marker in _SOF:
        if frame.get("ids") is not None:
            return "a second frame header (SOF)"
        if len(body) < 6:
            return "a short frame header"
        bits, height, width, n = body[0], int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
        if bits not in (8, 12, 16) or height == 0 or width == 0 or not 1 <= n <= 4 or len(body) != 6 + 3 * n:
            return f"a bad frame header ({width}x{height}, {n} components, {bits} bits)"
        frame["ids"] = {body[6 + 3 * i] for i in range(n)}
        if any(body[8 + 3 * i] > 3 or not 1 <= body[7 + 3 * i] >> 4 <= 4 or not 1 <= body[7 + 3 * i] & 15 <= 4
               for i in range(n)):
            return "a bad sampling factor or table number in the frame header"
    elif marker == 0xDA:
        n = body[0] if body else 0
        if frame.get("ids") is None:
            return "a scan before the frame header"
        if not 1 <= n <= 4 or len(body) != 4 + 2 * n or any(body[1 + 2 * i] not in frame["ids"] for i in range(n)):
            return "a bad scan header"
    elif marker == 0xDB:
        at = 0
        while at < len(body):
            precision, table = body[at] >> 4, body[at] & 15
            if precision > 1 or table > 3:
                return "a bad quantization table"
            at += 1 + 64 * (1 + precision)
        if at != len(body):
            return "a quantization table of the wrong length"
    elif marker == 0xC4:
        at = 0
        while at < len(body):
            if at + 17 > len(body) or body[at] >> 4 > 1 or body[at] & 15 > 3:
                return "a bad Huffman table"
            count = sum(body[at + 1:at + 17])
            if count > 256:
                return "a bad Huffman table"
            at += 17 + count
        if at != len(body):
            return "a Huffman table of the wrong length"
    return None


def _walk(read_at, size: int):
    """(problems, kept byte ranges) of the segments before SOS; read_at(offset, n) -> bytes.
    kept is None when dropping bytes cannot repair the header (then only Pillow may read it)."""
    problems: list[str] = []
    keep: list[tuple[int, int]] | None = [(0, 2)]
    frame: dict = {}
    pos = 2
    while pos < min(size, _MAX_HEADER):
        head = read_at(pos, 4)
        if len(head) < 2:
            break
        if head[0] != 0xFF:  # junk where a marker belongs: a damaged header, not a known oddity
            problems.append(f"stray bytes at offset {pos}")
            return problems, None
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
            return problems, None
        if len(head) < 4:
            break
        length = int.from_bytes(head[2:4], "big")
        if length < 2:
            problems.append(f"segment FF {marker:02X} with length {length} at offset {pos}")
            pos += 4
            continue
        if marker in _SOF or marker in (0xDA, 0xDB, 0xC4):
            why = _segment_problem(marker, read_at(pos + 4, length - 2), frame)
            if why is not None:
                problems.append(f"{why} at offset {pos}")
                return problems, None
        keep.append((pos, pos + 2 + length))
        if marker == 0xDA:  # start of scan: the rest is image data, untouched
            keep[-1] = (pos, size)
            return problems, keep
        pos += 2 + length
    if pos >= size or pos < _MAX_HEADER:
        problems.append("no image data (SOS) after the header")
        return problems, None
    keep.append((pos, size))
    return problems, keep


_FIRST_READ = 1 << 16  # one read holds the whole header of nearly every JPEG (EXIF thumbnails included)


def _reader(f, first: bytes):
    def read_at(offset: int, n: int) -> bytes:
        if offset + n <= len(first):
            return first[offset:offset + n]
        f.seek(offset)
        return f.read(n)
    return read_at


def header_problem(path: str) -> str | None:
    """Why DALI's JPEG parser would reject this file's header, or None (also for non-JPEG files
    and files that cannot be read: the other checks name those)."""
    try:
        with open(path, "rb") as f:
            first = f.read(_FIRST_READ)
            if not first.startswith(b"\xff\xd8\xff"):
                return None
            size = os.fstat(f.fileno()).st_size
            problems, _ = _walk(_reader(f, first), size)
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
