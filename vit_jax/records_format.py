"""The prepared-records format: ArrayRecord shards of `tf.train.Example`s and their manifest.

`python -m vit_jax.prepare_data` writes it once from an image folder; `'records:<dir>'` datasets
(`vit_jax.records_source`) read it. This module owns what both sides must agree on:
- one record = one image file as a `tf.train.Example` with `image` (the file's encoded bytes as
  they were, unless `--max_side` re-encoded a larger image as JPEG), `tf_decodes` (1: TF's
  decoder reads it, 0: Pillow's path, the verdict `vit_jax.image_folder` gives the file), `label`
  (int64 class index) and `file` (the path relative to the folder);
- shard names `<split>-<k>-of-<n>.array_record` (group size 1: random access per record), each
  followed by a `<shard>.json` sidecar once complete, and `manifest.json` once every shard is;
- the manifest: format name and version, class names, per split its shards with their record
  counts, records per class, the skipped files with their reasons, and the preparation options;
- reading and checking a manifest, with one clear error for each way a directory is not a
  finished preparation of this version (`RecordsError`).

It does not own listing or validating image files (`vit_jax.prepare_data`) nor the reading
pipeline (`vit_jax.records_source`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

import tensorflow as tf

FORMAT = "vit_jax.records"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
SIDECAR_SUFFIX = ".json"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record
_SHARD_PATTERN = re.compile(r"^(?P<split>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.array_record$")
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "tf_decodes": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


class RecordsError(ValueError):
    """A records directory that cannot be read as asked; the message names the fix."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def encode_record(data: bytes, tf_decodes: bool, label: int, file: str) -> bytes:
    """One image file's record (a serialised `tf.train.Example`)."""

    def feature(**kind: Any) -> tf.train.Feature:
        return tf.train.Feature(**kind)

    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": feature(bytes_list=tf.train.BytesList(value=[data])),
                "tf_decodes": feature(int64_list=tf.train.Int64List(value=[int(tf_decodes)])),
                "label": feature(int64_list=tf.train.Int64List(value=[label])),
                "file": feature(bytes_list=tf.train.BytesList(value=[file.encode()])),
            }
        )
    )
    return example.SerializeToString()


def parse_record(record: tf.Tensor) -> dict[str, tf.Tensor]:
    """Graph-mode parse of one serialised record: {'image', 'tf_decodes' (bool), 'label'}."""
    parsed = tf.io.parse_single_example(record, _FEATURES)
    return {
        "image": parsed["image"],
        "tf_decodes": tf.cast(parsed["tf_decodes"], tf.bool),
        "label": parsed["label"],
    }


def temporary_name(path: str) -> str:
    """`<path>.<host>-<pid>.tmp`: no two writers (hosts, reruns) share a temporary file."""
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"


def write_json(path: str, content: dict[str, Any]) -> None:
    """Atomically (a temporary file of this process, then a rename): a reader never sees half a
    file, and two hosts writing the same manifest at once do not mix their bytes."""
    tmp = temporary_name(path)
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a finished preparation of this version, or a `RecordsError`."""
    if not os.path.isdir(directory):
        raise RecordsError(
            f"Records directory {directory!r} does not exist. Prepare it from an image folder "
            f"with `python -m vit_jax.prepare_data --folder=<images> --out={directory}`."
        )
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise RecordsError(_no_manifest_message(directory))
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise RecordsError(
            f"Records manifest {path!r} cannot be read ({e}). Re-run the same "
            "`python -m vit_jax.prepare_data` command: it rewrites the manifest from the shards."
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecordsError(
            f"{path!r} is not a vit_jax records manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
            f"{FORMAT!r}). Point the dataset at a directory written by vit_jax.prepare_data."
        )
    if manifest.get("version") != VERSION:
        raise RecordsError(
            f"Records manifest {path!r} has format version {manifest.get('version')!r}; this "
            f"vit_jax reads version {VERSION}. Prepare the folder again with this version "
            "(`python -m vit_jax.prepare_data`, into a new --out), or read it with the vit_jax "
            "that wrote it."
        )
    return manifest


def check_shards(directory: str, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The split's shards (file, num_records); every file must be present (one listing)."""
    splits = manifest["splits"]
    if split not in splits:
        raise RecordsError(
            f"Records directory {directory!r} has splits {sorted(splits)}, not {split!r}. Set "
            f"train_split/test_split to one of them."
        )
    shards = splits[split]["shards"]
    present = set(os.listdir(directory))
    missing = [s["file"] for s in shards if s["file"] not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        raise RecordsError(
            f"Records directory {directory!r} lacks {len(missing)} of the {len(shards)} shard "
            f"files of split {split!r} listed in its manifest ({shown}). Copy them back, or "
            "re-run the same `python -m vit_jax.prepare_data` command to write them again."
        )
    return shards


def _no_manifest_message(directory: str) -> str:
    names = os.listdir(directory)
    done = [n for n in names if n.endswith(SHARD_SUFFIX + SIDECAR_SUFFIX)]
    totals = {int(m["n"]) for n in names if (m := _SHARD_PATTERN.match(n))}
    if done or totals:
        return (
            f"Records directory {directory!r} has no {MANIFEST}: its preparation did not finish "
            f"({len(done)} shard(s) complete). Re-run the same `python -m vit_jax.prepare_data` "
            "command (on every host that shared the work): it resumes with the shards already "
            "written and writes the manifest when all are there."
        )
    return (
        f"Records directory {directory!r} has no {MANIFEST} and no shards: it is not a prepared "
        f"records directory. Prepare one with `python -m vit_jax.prepare_data "
        f"--folder=<images> --out={directory}`."
    )
