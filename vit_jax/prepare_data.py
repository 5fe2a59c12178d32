"""Prepare an image folder once into ArrayRecord shards: `python -m vit_jax.prepare_data`.

    python -m vit_jax.prepare_data --folder=/data/imagenet21k --out=/data/in21k_records \
        [--holdout=10000] [--shard_size=1024] [--max_side=512] \
        [--process_index=i --process_count=n]

Reading an image folder directly (`'folder:/path'`) decodes every file at each start to find the
bad ones; at ImageNet-21k's 14M files that is a day before the first step. This command does that
work once: each file is checked by decoding it (in parallel threads), bad or odd files are
skipped with their reason, and the readable ones are stored as they are (their encoded bytes, no
re-encoding unless `--max_side` asks for a smaller copy) in ArrayRecord shards (the format:
`vit_jax.records_format`). Train on the result with `--config.dataset=records:<out>`: start-up
then reads the manifest only.

Why a writer of its own and not a tfds builder with `file_format='array_record'`: the shards must
be restartable one by one after a kill, shareable between hosts by shard index, keep the file's
bytes and TF/Pillow verdict exactly as the folder path decodes them, and list every skipped file
with its reason; a tfds builder re-encodes through its feature spec and prepares all or nothing.

Layouts: `<folder>/train/<class>/*` and `<folder>/test/<class>/*` (splits 'train' and 'test', as
`'folder:'` datasets), or `<folder>/<class>/*` with `--holdout=K` (K images, or a fraction if
< 1) held out as 'test', stratified over the classes and seeded (`--seed`); without `--holdout`
everything is 'train'.

Restartable: a shard is written to a temporary file and renamed when complete, then its sidecar;
a rerun skips the shards that have one. Several hosts share the work with
`--process_index/--process_count` (process i writes shards i, i + n, …); whichever finishes last
writes `manifest.json` (any rerun writes it once all shards are there).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from vit_jax import native_notices

with native_notices.hidden_for_command(__name__):  # these import TensorFlow
    from vit_jax import image_folder
    from vit_jax import records_format as rf

HOLDOUT_SPLIT = "test"
_SPLITS = ("train", "test")
_PROGRESS_EVERY_S = 5.0


class PrepareError(ValueError):
    """Arguments or a folder that cannot be prepared; raised before any shard is written."""


@dataclasses.dataclass(frozen=True)
class Options:
    folder: str
    out: str
    shard_size: int = 1024  # files per shard (fewer records where files were skipped)
    holdout: float = 0.0  # single-folder layout: images (≥ 1) or fraction (< 1) held out
    seed: int = 0  # of the held-out choice
    max_side: int = 0  # > 0: re-encode images with a longer side above it (JPEG, quality 95)
    process_index: int = 0
    process_count: int = 1
    workers: int = 0  # decoding threads (0: 2 per CPU core)

    def recipe(self) -> dict[str, Any]:
        """The options the records depend on (not where or by how many hosts)."""
        return {
            "shard_size": self.shard_size,
            "holdout": self.holdout,
            "seed": self.seed,
            "max_side": self.max_side,
        }


@dataclasses.dataclass(frozen=True)
class Shard:
    split: str
    index: int
    count: int
    files: tuple[tuple[str, int], ...]  # (path relative to the folder, label)

    @property
    def name(self) -> str:
        return rf.shard_name(self.split, self.index, self.count)


@dataclasses.dataclass(frozen=True)
class Plan:
    class_names: tuple[str, ...]
    shards: tuple[Shard, ...]
    fingerprint: str  # of the recipe and every (split, label, file): hosts must agree on it


# ----------------------------------------------------------------------------------------------
# Planning: which files go to which shard (listing only, no decoding).


def check_options(options: Options) -> None:
    folder, out = os.path.realpath(options.folder), os.path.realpath(options.out)
    if not os.path.isdir(folder):
        raise PrepareError(f"--folder={options.folder!r} is not a directory.")
    if out == folder or out.startswith(folder + os.sep):
        raise PrepareError(
            f"--out={options.out!r} is inside --folder={options.folder!r}: the shards would be "
            "listed as images of the folder. Choose an --out outside it."
        )
    if options.shard_size < 1:
        raise PrepareError(f"--shard_size must be >= 1, got {options.shard_size}.")
    if options.holdout < 0:
        raise PrepareError(
            f"--holdout must be >= 0 (images, or a fraction < 1), got {options.holdout}."
        )
    if options.max_side < 0:
        raise PrepareError(f"--max_side must be >= 0 (0: keep the files), got {options.max_side}.")
    if options.process_count < 1:
        raise PrepareError(f"--process_count must be >= 1, got {options.process_count}.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError(f"--out={options.out!r} exists and is not a directory.")
    if not 0 <= options.process_index < options.process_count:
        raise PrepareError(
            f"--process_index={options.process_index} is not in [0, --process_count="
            f"{options.process_count})."
        )


def make_plan(options: Options) -> Plan:
    """The shards of every split; the same on every host for the same folder and recipe."""
    check_options(options)
    folder = os.path.realpath(options.folder)
    has_splits = [os.path.isdir(os.path.join(folder, s)) for s in _SPLITS]
    if any(has_splits):
        if not all(has_splits):
            present, missing = (_SPLITS[has_splits.index(v)] for v in (True, False))
            raise PrepareError(
                f"--folder={options.folder!r} has {present}/ but no {missing}/ directory; "
                f"expected {folder}/train/<class>/* and {folder}/test/<class>/*, or "
                f"{folder}/<class>/* with --holdout."
            )
        if options.holdout:
            raise PrepareError(
                f"--holdout={options.holdout} applies to a folder of class directories; "
                f"{options.folder!r} already has train/ and test/."
            )
        class_names = _class_names(os.path.join(folder, "train"))
        files = {split: _list_split(folder, split, class_names) for split in _SPLITS}
    else:
        class_names = _class_names(folder)
        files = _hold_out(_list_split(folder, "", class_names), options)
    digest = hashlib.sha256(repr((rf.VERSION, options.recipe(), class_names)).encode())
    shards = []
    for split, entries in files.items():
        count = max(1, -(-len(entries) // options.shard_size))
        for k in range(count):
            part = tuple(entries[k * options.shard_size : (k + 1) * options.shard_size])
            shards.append(Shard(split, k, count, part))
        for path, label in entries:
            digest.update(f"{split}\t{label}\t{path}\n".encode())
    return Plan(class_names, tuple(shards), digest.hexdigest()[:16])


def _class_names(directory: str) -> tuple[str, ...]:
    names = image_folder.class_dirs(directory)
    if not names:
        raise PrepareError(
            f"{directory!r} has no class sub-directories: expected <class>/<image files>."
        )
    return tuple(names)


def _list_split(folder: str, split: str, class_names: tuple[str, ...]) -> list[tuple[str, int]]:
    """(path relative to the folder, label) of every file, class by class, sorted."""
    split_dir = os.path.join(folder, split)
    unknown = image_folder.unknown_classes(split_dir, class_names)
    if unknown:
        raise PrepareError(f"{split_dir!r} has classes not in train/: {unknown[:10]}.")
    entries = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        entries += [(os.path.relpath(p, folder), label) for p in image_folder.list_files(class_dir)]
    if not entries:
        raise PrepareError(f"{split_dir!r} has no image files in its class directories.")
    return entries


def _hold_out(entries: list[tuple[str, int]], options: Options) -> dict[str, list[tuple[str, int]]]:
    """Seeded, class-stratified held-out split of a single folder (largest remainder)."""
    if not options.holdout:
        return {"train": entries}
    n = len(entries)
    wanted = round(options.holdout * n) if options.holdout < 1 else int(options.holdout)
    if not 0 < wanted < n:
        raise PrepareError(
            f"--holdout={options.holdout} holds out {wanted} of the folder's {n} files; it must "
            "leave at least one file on each side."
        )
    labels = np.array([label for _, label in entries])
    counts = np.bincount(labels)
    share = counts * wanted / n
    take = np.floor(share).astype(int)
    order = np.lexsort((np.arange(len(counts)), -(share - take)))  # largest remainder first
    take[order[: wanted - take.sum()]] += 1
    rng = np.random.default_rng(options.seed)
    held = np.zeros(n, bool)
    starts = np.searchsorted(labels, np.arange(len(counts)))  # entries are sorted by label
    for label in np.flatnonzero(take):
        members = starts[label] + np.arange(counts[label])
        held[rng.choice(members, size=take[label], replace=False)] = True
    return {
        "train": [e for e, h in zip(entries, held, strict=True) if not h],
        HOLDOUT_SPLIT: [e for e, h in zip(entries, held, strict=True) if h],
    }


# ----------------------------------------------------------------------------------------------
# Writing.


def prepare(options: Options, log=print) -> dict[str, Any] | None:
    """Writes this process's shards (skipping finished ones); the manifest once all are there.

    Returns the manifest, or None while other processes' shards are still missing.
    """
    plan = make_plan(options)
    os.makedirs(options.out, exist_ok=True)
    done = _finished_shards(options.out, plan)
    own = [
        s
        for j, s in enumerate(plan.shards)
        if j % options.process_count == options.process_index and s.name not in done
    ]
    total_files = sum(len(s.files) for s in plan.shards)
    log(
        f"prepare_data: {total_files:,} files in {len(plan.class_names):,} classes, "
        f"{len(plan.shards)} shards; {len(done)} already written, {len(own)} to write here."
    )
    progress = _Progress(sum(len(s.files) for s in own), log)
    workers = options.workers or 2 * (os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for shard in own:
            sidecar = _write_shard(shard, options, plan.fingerprint, pool, progress)
            done[shard.name] = sidecar
    progress.finish()
    done = _finished_shards(options.out, plan)
    if len(done) < len(plan.shards):
        log(
            f"prepare_data: {len(done)} of {len(plan.shards)} shards written; the other "
            "processes' are still missing. The manifest is written when all are there (by the "
            "last process to finish, or by rerunning this command)."
        )
        return None
    manifest = _manifest(options, plan, done)
    rf.write_json(os.path.join(options.out, rf.MANIFEST), manifest)
    _report(manifest, options.out, log)
    return manifest


def _finished_shards(out: str, plan: Plan) -> dict[str, dict[str, Any]]:
    """Sidecars of the plan's complete shards; another preparation's shards are an error."""
    present = set(os.listdir(out))
    planned = {s.name for s in plan.shards}
    foreign = sorted(n for n in present if n.endswith(rf.SHARD_SUFFIX) and n not in planned)
    if foreign:
        raise PrepareError(
            f"--out={out!r} holds shards this preparation would not write (e.g. {foreign[0]}): "
            "another folder, --shard_size or --holdout. Use an empty --out, or remove it."
        )
    done = {}
    for shard in plan.shards:
        if shard.name not in present or shard.name + rf.SIDECAR_SUFFIX not in present:
            continue
        try:
            with open(os.path.join(out, shard.name + rf.SIDECAR_SUFFIX)) as f:
                sidecar = json.load(f)
        except ValueError:  # written atomically: only a damaged disk gets here; redo the shard
            continue
        if sidecar.get("fingerprint") != plan.fingerprint:
            raise PrepareError(
                f"--out={out!r} holds shards of another preparation (fingerprint "
                f"{sidecar.get('fingerprint')}, this one {plan.fingerprint}: a different folder "
                "content, recipe option or vit_jax version). Use an empty --out, or remove it."
            )
        done[shard.name] = sidecar
    return done


def _write_shard(shard, options, fingerprint, pool, progress) -> dict[str, Any]:
    from array_record.python import array_record_module

    folder = os.path.realpath(options.folder)
    path = os.path.join(options.out, shard.name)
    for name in os.listdir(options.out):  # left by a kill while writing this shard
        if name.startswith(shard.name + ".") and name.endswith(".tmp"):
            os.remove(os.path.join(options.out, name))
    tmp = rf.temporary_name(path)
    writer = array_record_module.ArrayRecordWriter(tmp, rf.WRITER_OPTIONS)
    per_class: dict[int, int] = {}
    skipped, size = [], 0
    jobs = ((os.path.join(folder, file), options.max_side) for file, _ in shard.files)
    for (file, label), (data, tf_decodes, reason) in zip(
        shard.files, pool.map(_read_checked, jobs), strict=True
    ):
        progress.step()
        if data is None:
            skipped.append({"file": file, "reason": reason})
            continue
        writer.write(rf.encode_record(data, tf_decodes, label, file))
        per_class[label] = per_class.get(label, 0) + 1
        size += len(data)
    writer.close()
    os.replace(tmp, path)
    sidecar = {
        "fingerprint": fingerprint,
        "split": shard.split,
        "num_records": sum(per_class.values()),
        "per_class": {str(k): v for k, v in sorted(per_class.items())},
        "image_bytes": size,
        "skipped": skipped,
    }
    rf.write_json(path + rf.SIDECAR_SUFFIX, sidecar)
    return sidecar


def _read_checked(job: tuple[str, int]) -> tuple[bytes | None, bool, str | None]:
    """(bytes to store, TF decodes them, None) for a readable image, else (None, False, why)."""
    path, max_side = job
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            return None, False, "not a regular file"
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, False, f"cannot be read ({e.strerror or e})"
    if not data:
        return None, False, "empty file"
    try:
        tf_decodes = image_folder.tf_decodes_data(data)
        if max_side:
            data, tf_decodes = _shrunk(data, tf_decodes, max_side)
    except Exception as e:  # any decoder failure means "skip this file"
        message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        return None, False, f"not a readable image ({type(e).__name__}: {message})"
    return data, tf_decodes, None


def _shrunk(data: bytes, tf_decodes: bool, max_side: int) -> tuple[bytes, bool]:
    """An image with a longer side above `max_side`, area-resized to it and JPEG-encoded."""
    import tensorflow as tf

    with Image.open(io.BytesIO(data)) as header:  # the size, without decoding
        width, height = header.size
    if max(height, width) <= max_side:
        return data, tf_decodes
    image = image_folder.decode_data(tf.constant(data), tf.constant(tf_decodes))
    scale = max_side / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    small = tf.image.resize(image, size, method="area")
    small = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)
    return tf.io.encode_jpeg(small, quality=95).numpy(), True


def _manifest(options: Options, plan: Plan, done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    skipped = []
    for shard in plan.shards:
        sidecar = done[shard.name]
        split = splits.setdefault(
            shard.split, {"num_records": 0, "shards": [], "per_class": [0] * len(plan.class_names)}
        )
        split["num_records"] += sidecar["num_records"]
        split["shards"].append({"file": shard.name, "num_records": sidecar["num_records"]})
        for label, count in sidecar["per_class"].items():
            split["per_class"][int(label)] += count
        skipped += [{"split": shard.split, **s} for s in sidecar["skipped"]]
    return {
        "format": rf.FORMAT,
        "version": rf.VERSION,
        "fingerprint": plan.fingerprint,
        "folder": os.path.realpath(options.folder),
        "options": options.recipe(),
        "class_names": list(plan.class_names),
        "splits": splits,
        "image_bytes": sum(s["image_bytes"] for s in done.values()),
        "skipped": skipped,
    }


def _report(manifest: dict[str, Any], out: str, log) -> None:
    counts = ", ".join(f"{k} {v['num_records']:,}" for k, v in manifest["splits"].items())
    log(
        f"prepare_data: wrote {out}/{rf.MANIFEST}: {counts} records, "
        f"{manifest['image_bytes'] / 2**20:,.1f} MiB of images."
    )
    skipped = manifest["skipped"]
    if skipped:
        shown = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
        log(f"prepare_data: skipped {len(skipped)} file(s) (all listed in the manifest): {shown}")
    empty = [
        manifest["class_names"][c]
        for split in manifest["splits"].values()
        for c, n in enumerate(split["per_class"])
        if n == 0
    ]
    if empty:
        log(f"prepare_data: warning: classes without a readable image in a split: {empty[:10]}")


class _Progress:
    """A progress line (bar, count, rate, ETA) every few seconds and at the end."""

    def __init__(self, total: int, log):
        self.total, self.done, self.log = total, 0, log
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            self.log(self.line(now))

    def finish(self) -> None:
        if self.total:
            self.log(self.line(time.monotonic()))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else float("inf")
        filled = round(20 * self.done / max(self.total, 1))
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 * 365 else "?"
        return (
            f"[{'#' * filled}{'.' * (20 - filled)}] {self.done:,}/{self.total:,} files "
            f"{rate:,.0f}/s, elapsed {time.strftime('%H:%M:%S', time.gmtime(elapsed))}, "
            f"ETA {eta_text}"
        )


# ----------------------------------------------------------------------------------------------
# Command line.

_FOLDER = flags.DEFINE_string(
    "folder", None, "Image folder: train/<class>/*, test/<class>/* or <class>/*."
)
_OUT = flags.DEFINE_string(
    "out", None, "Directory for the shards and manifest.json (outside --folder)."
)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1024, "Files per shard.")
_HOLDOUT = flags.DEFINE_float(
    "holdout", 0.0, "Single-folder layout: images (>= 1) or fraction (< 1) held out as 'test'."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out choice.")
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", 0, "> 0: re-encode images whose longer side exceeds it, as JPEG."
)
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", 0, "This host's index when several share the work."
)
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "How many hosts share the work.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Decoding threads (0: 2 per CPU core).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not _FOLDER.value or not _OUT.value:
        raise app.UsageError("--folder and --out are required.")
    options = Options(
        folder=_FOLDER.value,
        out=_OUT.value,
        shard_size=_SHARD_SIZE.value,
        holdout=_HOLDOUT.value,
        seed=_SEED.value,
        max_side=_MAX_SIDE.value,
        process_index=_PROCESS_INDEX.value,
        process_count=_PROCESS_COUNT.value,
        workers=_WORKERS.value,
    )
    try:
        prepare(options, log=lambda line: print(line, flush=True))
    except (PrepareError, OSError) as e:  # FolderPermissionError is an OSError
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
