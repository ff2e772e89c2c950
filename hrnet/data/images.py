"""One source image -> the JPEG bytes a record stores, and its boxes.

An RGB or grayscale JPEG without EXIF rotation is stored byte for byte, as slim's converter
stores it (its size read from the header, PIL reading only the markers on open; readers
decode with channels=3, so a grayscale one becomes RGB there, and slim's schema calls every
record RGB); PNGs, CMYK and EXIF-rotated images are decoded and re-encoded as RGB JPEG.
Files that cannot become a record raise BadImage with the reason, which the converter counts
and lists.
"""
import io
import re
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence, Tuple

Box = Tuple[float, float, float, float]


# JPEG pixel modes stored as they are: re-encoding a grayscale one as RGB made it 45% larger
# and lossier, where slim keeps its bytes.
KEPT_MODES = ("RGB", "L")


class BadImage(Exception):
    """A source file that cannot become a record; the message is the reason."""


def _why(e: Exception) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x7f...>``): a
    skip reason must read the same in every run, or two identical runs differ."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def _has_end_marker(data: bytes) -> bool:
    # Entropy-coded JPEG data never holds FF D9 (0xFF is stuffed), so an EOI near the end
    # means the file is complete; tiny files are simply decoded.
    return len(data) > 8192 and b"\xff\xd9" in data[-1024:]


# Markers that stand alone (no length field): TEM, RST0-7, SOI, EOI.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}
# What may follow a scan: another scan's tables and header (progressive JPEGs), or the end.
_AFTER_SCAN = {0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xD9, 0xFE, *range(0xE0, 0xF0)}


def jpeg_structure_error(data: bytes) -> Optional[str]:
    """What is wrong with a JPEG's marker structure, or None. libjpeg (under PIL and TF)
    decodes through most damage inside the entropy-coded data, with a warning at most; this
    walk finds what such damage leaves behind: a marker where none may be (0xFF followed by
    anything but a stuffed 0x00 or the next restart marker), a segment that runs past the
    file or is not followed by a marker. Damage that happens to hold no 0xFF byte passes."""
    if data[:2] != b"\xff\xd8":
        return "no JPEG start marker"
    i, n, in_scan, restart_interval, next_rst = 2, len(data), False, 0, 0
    while i < n:
        if in_scan:
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                return "the data ends inside a scan"
            code = data[j + 1]
            if code == 0x00:
                i = j + 2
                continue
            if code == 0xFF:  # fill bytes before a marker
                i = j + 1
                continue
            if 0xD0 <= code <= 0xD7:
                if not restart_interval or code - 0xD0 != next_rst:
                    return f"an unexpected restart marker FF{code:02X} at byte {j}"
                next_rst = (next_rst + 1) % 8
                i = j + 2
                continue
            if code not in _AFTER_SCAN:
                return f"marker FF{code:02X} inside the image data at byte {j}"
            in_scan, i = False, j
        if data[i] != 0xFF:
            return f"byte {i} should start a marker"
        code = data[i + 1] if i + 1 < n else -1
        if code == 0xFF:
            i += 1
            continue
        if code == 0xD9:
            # What follows an end marker is a camera's trailer, an appended image or a motion
            # photo's video, none of it ours; but image data ending in the file's real end
            # marker, after this one, means damage made an end marker of its own.
            rest = data[i + 2:]
            if len(rest) > 2 and rest.endswith(b"\xff\xd9") and not rest.startswith(b"\xff\xd8") \
                    and b"ftyp" not in rest[:16]:
                return f"an end marker at byte {i}, {len(rest)} bytes before the file's own end marker"
            return None
        if code in _STANDALONE or code < 0:
            return f"an unexpected marker FF{code:02X} at byte {i}" if code >= 0 else "the data ends at a marker"
        if i + 4 > n:
            return "the data ends in a segment header"
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return f"segment FF{code:02X} at byte {i} runs past the end of the file"
        if code == 0xDD and length >= 4:
            restart_interval = int.from_bytes(data[i + 4:i + 6], "big")
        if code == 0xDA:
            in_scan, next_rst = True, 0
        i += 2 + length
    return "no JPEG end marker"


def _orientation(image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def read_image(path: str, quality: int = 95, verify: bool = False) -> Tuple[bytes, int, int, Optional[str]]:
    """(JPEG bytes, height, width, why it was re-encoded or None) of one file.

    An RGB or grayscale JPEG without EXIF rotation comes back byte for byte; its size is read from the
    header, and it is decoded only to check a file that does not end in an EOI marker
    (truncated) or when ``verify``. Everything else is decoded, turned upright and RGB,
    and encoded as JPEG. Raises BadImage with the reason for files that cannot be read.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = image.format, image.mode, image.size
    except Image.DecompressionBombError as e:
        # A header can claim any size; decoding it would take that much memory.
        raise BadImage(f"a possible decompression bomb, not decoded ({_why(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a readable image ({_why(e)})") from None
    orientation = _orientation(image)
    if fmt in ("JPEG", "MPO") and mode in KEPT_MODES and orientation == 1:
        if verify or not _has_end_marker(data):
            try:
                image.load()
            except Exception as e:
                raise BadImage(f"truncated or corrupt JPEG ({_why(e)})") from None
        problem = jpeg_structure_error(data) if verify else None
        if problem:
            raise BadImage(f"corrupt JPEG ({problem})")
        return data, height, width, None
    try:
        image.load()
        reasons = []
        if fmt not in ("JPEG", "MPO"):
            reasons.append(fmt or "unknown format")
        elif mode != "RGB":
            reasons.append(mode)
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
            reasons.append("EXIF-rotated")
        image = _to_rgb(image)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("truncated or corrupt {} ({})".format(fmt or "image", _why(e))) from None
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), image.height, image.width, "+".join(reasons)


def _to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; show them on white, as a viewer does.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale (PNG): scaled to 8 bits, as a viewer shows it.
        import numpy as np

        pixels = np.asarray(image, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise BadImage(f"unsupported {image.mode} pixel values outside 0..65535")
        scale = 257.0 if image.mode != "I" or pixels.max() > 255 else 1.0
        return Image.fromarray(np.round(pixels / scale).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise BadImage("unsupported floating-point pixels (mode F)")
    return image.convert("RGB")


def orient_boxes(boxes: Sequence[Sequence[float]], orientation: int) -> List[Box]:
    """Normalized (xmin, ymin, xmax, ymax) boxes of the raw image, in the upright image
    ``ImageOps.exif_transpose`` makes for EXIF ``orientation`` (1-8)."""

    def point(x, y):
        return {1: (x, y), 2: (1 - x, y), 3: (1 - x, 1 - y), 4: (x, 1 - y),
                5: (y, x), 6: (1 - y, x), 7: (1 - y, 1 - x), 8: (y, 1 - x)}.get(orientation, (x, y))

    out = []
    for xmin, ymin, xmax, ymax in boxes:
        (x0, y0), (x1, y1) = point(xmin, ymin), point(xmax, ymax)
        out.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return out


def read_xml_boxes(path: str) -> Tuple[Optional[Tuple[int, int]], List[Box]]:
    """((width, height) the boxes refer to, pixel boxes) of an ImageNet/PASCAL XML annotation."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    ref = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        ref = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    boxes = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        if b is not None:
            boxes.append(tuple(float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return ref, boxes


def normalize_boxes(boxes, ref_size: Tuple[int, int]) -> List[Box]:
    """Pixel boxes -> [0, 1] boxes, clipped; empty ones dropped."""
    w, h = float(ref_size[0]), float(ref_size[1])
    out = []
    for xmin, ymin, xmax, ymax in boxes:
        xmin, xmax = sorted((min(max(xmin / w, 0.0), 1.0), min(max(xmax / w, 0.0), 1.0)))
        ymin, ymax = sorted((min(max(ymin / h, 0.0), 1.0), min(max(ymax / h, 0.0), 1.0)))
        if xmax > xmin and ymax > ymin:
            out.append((xmin, ymin, xmax, ymax))
    return out


def _raw_size(path: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _raw_orientation(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return _orientation(image)


def record_image(path: str, xml: Optional[str], boxes: Sequence[Box], quality: int = 95,
                 verify: bool = False) -> Tuple[bytes, int, int, Optional[str], List[Box]]:
    """(JPEG bytes, height, width, why re-encoded or None, normalized boxes) of one source
    image: its pixel ``boxes`` (from a labels file) or those of its ``xml`` annotation,
    normalized to the image as stored (upright, for an EXIF-rotated one). Raises BadImage,
    ET.ParseError, OSError or ValueError for what cannot become a record."""
    data, height, width, why = read_image(path, quality, verify)
    ref = None
    if xml:
        ref, boxes = read_xml_boxes(xml)
    out: List[Box] = []
    if boxes:
        rotated = bool(why and "EXIF" in why)
        out = normalize_boxes(boxes, ref or (_raw_size(path) if rotated else (width, height)))
        if rotated:
            out = orient_boxes(out, _raw_orientation(path))
    return data, height, width, why, out
