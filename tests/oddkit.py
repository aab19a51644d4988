"""A corpus of real-world image oddities, built by editing the bytes of valid files.

ODD_JPEGS: edits that Pillow decodes and DALI 2.4's CPU decoder (nvImageCodec over
libjpeg-turbo) rejects, found by trying each kind of oddity on DALI 2.4 (`tests/oddkit.py`
is checked against both decoders by test_data_bad_files.py, so a DALI upgrade that starts
accepting one shows up there):
    app_len_0     an APPn segment whose length field is 0 (a truncated APP segment)
    app_len_1     the same with length 1 (shorter than the length field itself)
    ff00_header   `FF 00` between SOI and the first segment (a stuffed byte where a marker belongs)
    rst_header    an RST0 marker (FF D0) before the frame header (an unusual marker in the header)
Tried and decoded by BOTH (so not oddities for this test): repeated APP0/DQT/DHT, broken Adobe
(APP14) and Photoshop (APP13) segments, bogus or truncated EXIF, broken ICC, COM, DNL, fill
bytes (FF FF FF) before a marker, `FF 00` inside an APP payload, junk after EOI.
Rejected by BOTH (the cheap pre-check or Pillow catches them): junk before or right after SOI,
an oversized APPn length, a second SOI/SOF, a TEM or 0xF0 marker, EOI in the header.

`mutate` is the seeded fuzzer: it flips, drops and inserts bytes of any file.
"""
from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image


def _after_soi(data: bytes, extra: bytes) -> bytes:
    return data[:2] + extra + data[2:]


ODD_EDITS = {
    "app_len_0": lambda d: _after_soi(d, b"\xff\xe5\x00\x00"),
    "app_len_1": lambda d: _after_soi(d, b"\xff\xe5\x00\x01"),
    "ff00_header": lambda d: _after_soi(d, b"\xff\x00"),
    "rst_header": lambda d: _after_soi(d, b"\xff\xd0"),
}


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


BENIGN_EDITS = {  # odd, but both decoders read them
    "adobe_broken": lambda d: _after_soi(d, _segment(0xEE, b"Adobe\x00\x64")),
    "photoshop_broken": lambda d: _after_soi(d, _segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\xff\xff\xff\xff")),
    "exif_bogus": lambda d: _after_soi(d, _segment(0xE1, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")),
    "app0_twice": lambda d: _after_soi(d, _segment(0xE0, b"JFIF\x00\x01\x02\x00\x00\x01\x00\x01\x00\x00") * 2),
}


def picture(h: int, w: int, seed: int, tint: int | None = None) -> Image.Image:
    """A smooth noisy picture; `tint` (0..2) raises one channel so a class is visible in pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x * 4, y * 4, (x + y) * 2], -1) + rng.normal(60, 12, (h, w, 3))
    if tint is not None:
        img[..., tint] += 120
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-4 random edits: flip a bit, drop a run of bytes, or insert random bytes (anywhere but the
    signature's first 3 bytes and the last 12, so the cheap pre-check still passes and the damage
    has to be found mid-run)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        lo, hi = 3, max(4, len(out) - 12)
        at = int(rng.integers(lo, hi))
        kind = rng.integers(0, 3)
        if kind == 0:
            out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del out[at:at + int(rng.integers(1, 9))]
        else:
            out[at:at] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    return bytes(out)


def pil_decodes(path: str) -> bool:
    from automix_fast.data.transforms import load_rgb
    from automix_fast.errors import DataError

    try:
        load_rgb(path)
    except DataError:
        return False
    return True


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def odd_folder(root: str, per_class: int = 10, size: int = 20, every: int = 10) -> list[str]:
    """train/ and val/ with classes a and b; one file in `every` is an ODD_EDITS oddity (cycling
    through the kinds). Returns the odd files' paths."""
    odd, n = [], 0
    kinds = list(ODD_EDITS)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for c, cls in enumerate("ab"):
            for i in range(count):
                data = jpeg_bytes(picture(size, size + i % 3, seed=100 * c + i + (0 if split == "train" else 50), tint=2 * c))
                path = os.path.join(root, split, cls, f"{i:03d}.jpg")
                if n % every == every // 2:
                    data = ODD_EDITS[kinds[len(odd) % len(kinds)]](data)
                    odd.append(path)
                write(path, data)
                n += 1
    return odd


# Both Pillow and DALI refuse these, yet they pass the cheap pre-check (JPEG signature, EOI at the
# end). The first two have a damaged frame header / Huffman table, which the DALI loader's header
# screening (jpeg_header.py) finds before any pipeline runs; `undefined_huffman` (a scan naming a
# Huffman table that was never defined) passes the screening too and fails only inside a pipeline,
# at the decode stage (measured safe for DALI 2.4 at batch 32, unlike parser errors).
def _sof_zero_height(d: bytes) -> bytes:
    i = d.find(b"\xff\xc0")
    return d[:i + 5] + b"\x00\x00" + d[i + 7:]


def _bogus_huffman(d: bytes) -> bytes:
    i = d.find(b"\xff\xc4")
    return d[:i + 5] + b"\xff" * 16 + d[i + 21:]


def _undefined_huffman(d: bytes) -> bytes:
    i = d.find(b"\xff\xda")
    out = bytearray(d)
    for k in range(d[i + 4]):
        out[i + 6 + 2 * k] = 0x33  # DC/AC table 3 for every component
    return bytes(out)


SCREENED_UNREADABLE = {"sof_zero_height": _sof_zero_height, "bogus_huffman": _bogus_huffman}
UNREADABLE_EDITS = {**SCREENED_UNREADABLE, "undefined_huffman": _undefined_huffman}
