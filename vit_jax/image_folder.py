"""Image files: listing an image folder's class directories and decoding one file.

This module owns:
- listing the class directories of a folder (`class_dirs`, `unknown_classes`) and the files of
  a class folder (`list_files`): recursive, hidden names skipped, sorted,
  directory links followed with link loops guarded, a file reached twice through links counted
  once, and a directory that cannot be read reported as one clear error (`FolderPermissionError`);
- the one image decoder every path of the project uses, so that training, evaluation,
  `predict` and `attention` see the same pixels for the same file:
  - `decode_encoded`: TF's default decoder, `tf.io.decode_image(data, channels=3,
    expand_animations=False)` (JPEG with its default INTEGER_FAST IDCT and fancy upsampling, as
    `tf.io.decode_jpeg` and tfds decode them, and as the original vit_jax reads image folders);
  - `tf_decodes(path)`: whether a file goes through TF's decoder or through Pillow, decided once
    per file when an image folder is validated (the verdict travels next to the path);
  - `decode_file(path, tf_decodes)`: the graph-mode decode of a file by that verdict, and
    `decode_data(data, tf_decodes)` the same for a file's bytes (prepared records hold them);
  - `read_image(path)`: the same, eagerly, for one file (what `input_pipeline.eval_image`,
    i.e. `predict.load_image`, and the attention overlay use).

Which decoder: a JPEG (Pillow format JPEG or MPO) in grey or YCbCr/RGB is TF's: a JPEG has no
single correct decoding, and TF's default one is the reference (tfds data, the original
pipelines). Any other file TF reads (PNG, GIF, BMP, WebP) is decoded by both at validation and
goes through TF only where both give the same pixels, so there the choice changes no pixel. The
rest goes through Pillow: CMYK/YCCK JPEGs (TF converts them too, but differently: up to 2/255),
TIFF and the other formats TF cannot read, and files where the two disagree. Measured
(TF 2.21, Pillow 13): grey, grey + alpha, RGB, RGBA and palette PNGs, with or without a
transparent index, GIF, BMP and WebP agree (alpha is dropped, not composited, by both); 16-bit
grey PNGs do not: TF keeps the high byte (⌊x / 256⌋), Pillow's path scales to the nearest
level (round(x / 257): 0 ↦ 0, 65535 ↦ 255, no bias), which is kept for them.

Pillow's path (`_to_rgb`): 16-bit grey scaled as above, palette with transparency via RGBA,
then `convert('RGB')` (CMYK converted by Pillow, alpha dropped).

It does not own which files form a dataset split, the multi-process split of the validation, or
any preprocessing after decoding (`vit_jax.input_pipeline`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from PIL import Image

# Pillow formats whose TF decoding is the reference even where Pillow's pixels differ.
_JPEG_FORMATS = ("JPEG", "MPO")
_JPEG_MODES = ("L", "RGB")  # CMYK/YCCK JPEGs go through Pillow
# Other formats TF's decode_image reads; TF is used for a file where its pixels equal Pillow's.
_TF_IF_EQUAL_FORMATS = ("PNG", "GIF", "BMP", "WEBP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class FolderPermissionError(PermissionError):
    """A directory of an image folder that this process may not read."""

    def __init__(self, directory: str, error: OSError):
        super().__init__(
            f"Image folder directory {directory!r} cannot be read: permission denied for this "
            f"user ({error.strerror or error}). Make it readable, e.g. `chmod -R a+rX "
            f"{directory}`, or run as a user who can read it."
        )
        self.errno = error.errno  # str() stays the message above (no strerror is set)
        self.directory = directory


class ImageFiles(NamedTuple):
    """Image files and, per file, whether TF's decoder reads it (else Pillow).

    Arrays for a whole split, or one file's scalars (a `tf.data` element).
    """

    paths: Any  # str / bytes: array, tensor or scalar
    tf_decodes: Any  # bool, same shape


# ----------------------------------------------------------------------------------------------
# Listing.


def scan_dir(directory: str) -> list[os.DirEntry]:
    """The entries of one directory, sorted by name; a permission error names the directory."""
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda e: e.name)
    except PermissionError as e:
        raise FolderPermissionError(directory, e) from e


def class_dirs(directory: str) -> list[str]:
    """The names of `directory`'s non-hidden sub-directories (links followed), sorted."""
    return [e.name for e in scan_dir(directory) if e.is_dir() and e.name[0] != "."]


def unknown_classes(split_dir: str, class_names: tuple[str, ...]) -> list[str]:
    """Class directories of a split that the training split does not have."""
    return [name for name in class_dirs(split_dir) if name not in class_names]


def list_files(directory: str) -> list[str]:
    """Every non-hidden file under `directory`, sorted depth-first ([] if it is no directory).

    Directory links are followed; a directory reached again (a link loop, or two links to one
    directory) is listed once, at its first path, and so is a file reached through two links
    (compared by real path). Anything that is not a directory counts as a file (a broken link
    too: decoding then rejects it). A directory that cannot be read raises
    `FolderPermissionError` naming it.
    """
    if not os.path.isdir(directory):
        return []
    found: list[str] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    pending = [directory]  # a stack: depth-first, sub-directories in name order
    while pending:
        current = pending.pop()
        real_dir = os.path.realpath(current)
        if real_dir in seen_dirs:
            continue
        seen_dirs.add(real_dir)
        subdirs = []
        for entry in scan_dir(current):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                subdirs.append(entry.path)
                continue
            real = (
                os.path.realpath(entry.path)
                if entry.is_symlink()
                else os.path.join(real_dir, entry.name)
            )
            if real not in seen_files:
                seen_files.add(real)
                found.append(entry.path)
        pending += reversed(subdirs)
    return found


# ----------------------------------------------------------------------------------------------
# Decoding.


def decode_encoded(data: tf.Tensor) -> tf.Tensor:
    """TF's default decoder: encoded bytes → uint8 [H, W, 3] (first frame of an animation)."""
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def tf_decodes(path: str) -> bool:
    """True if the file goes through TF's decoder, False if through Pillow's path.

    Decodes the file to decide (see the module docstring); a file neither reads raises what
    Pillow raises (`OSError` and its subclasses, `ValueError`, `SyntaxError`,
    `Image.DecompressionBombError`), naming the file.
    """
    with open(path, "rb") as f:
        return _verdict(f.read(), lambda: path)


def tf_decodes_data(data: bytes) -> bool:
    """`tf_decodes` for a file's encoded bytes (a prepared record holds them as they were)."""
    return _verdict(data, lambda: io.BytesIO(data))


def _verdict(data: bytes, source: Callable[[], Any]) -> bool:
    """`tf_decodes` of `data`; Pillow reads `source()` (the path, for errors that name it)."""
    with Image.open(source()) as image:  # reads the header only
        file_format, mode, size = image.format, image.mode, image.size
    if file_format in _JPEG_FORMATS and mode in _JPEG_MODES:
        decoded = _tf_decode_bytes(data)
        if decoded is not None and decoded.shape == (size[1], size[0], 3):
            return True
    with Image.open(source()) as image:  # Pillow's path must read what TF does not
        pillow = _to_rgb(image)
    if file_format in _TF_IF_EQUAL_FORMATS:
        decoded = _tf_decode_bytes(data)
        return decoded is not None and np.array_equal(decoded, pillow)
    return False


def decode_file(path: tf.Tensor, tf_decodes: tf.Tensor) -> tf.Tensor:
    """A file as uint8 [H, W, 3], by TF's decoder or Pillow's path (graph mode or eager)."""
    image = tf.cond(
        tf.convert_to_tensor(tf_decodes, tf.bool),
        lambda: decode_encoded(tf.io.read_file(path)),
        lambda: _pillow_decode(path, _read_rgb),
    )
    return tf.ensure_shape(image, [None, None, 3])


def decode_data(data: tf.Tensor, tf_decodes: tf.Tensor) -> tf.Tensor:
    """`decode_file` for a file's encoded bytes: the same pixels as decoding the file."""
    image = tf.cond(
        tf.convert_to_tensor(tf_decodes, tf.bool),
        lambda: decode_encoded(data),
        lambda: _pillow_decode(data, _read_rgb_data),
    )
    return tf.ensure_shape(image, [None, None, 3])


def read_image(path: str) -> np.ndarray:
    """One file as uint8 [H, W, 3], decoded as an image folder decodes it.

    An unreadable file raises what `tf_decodes` raises.
    """
    verdict = tf_decodes(path)
    return decode_file(tf.constant(path), tf.constant(verdict)).numpy()


def _tf_decode_bytes(data: bytes) -> np.ndarray | None:
    """TF's decoding of encoded bytes, or None where TF cannot read them."""
    try:
        return decode_encoded(tf.constant(data)).numpy()
    except (tf.errors.OpError, ValueError):
        return None


def _pillow_decode(source: tf.Tensor, read: Callable[[Any], np.ndarray]) -> tf.Tensor:
    image = tf.numpy_function(read, [source], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def _read_rgb(path: str | bytes | np.ndarray) -> np.ndarray:
    """Pillow's path for a file (a str, or bytes from a tensor): uint8 RGB [H, W, 3]."""
    path = path.item() if isinstance(path, np.ndarray) else path  # eager numpy_function: 0-d
    path = path.decode() if isinstance(path, bytes) else path
    with Image.open(path) as image:
        return _to_rgb(image)


def _read_rgb_data(data: bytes | np.ndarray) -> np.ndarray:
    """Pillow's path for encoded bytes: uint8 RGB [H, W, 3]."""
    data = data.item() if isinstance(data, np.ndarray) else data
    with Image.open(io.BytesIO(data)) as image:
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB [H, W, 3]: 16-bit grey scaled to the nearest level, alpha dropped."""
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64) / 257.0
        gray = np.clip(np.round(array), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
