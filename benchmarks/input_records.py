"""Prepared records against image folders: start-up to the first batch, and input rate.

    python benchmarks/input_records.py [--sizes=10000,200000] [--rate_images=1000] \
        [--workers=1,2] [--root=/tmp/vit_jax_input_bench]

1. Start-up: for each size, a folder of that many tiny JPEGs (100 classes, 1 % of them in
   test/) is made, prepared once with `vit_jax.prepare_data` (its rate and disk use reported),
   then a fresh process times `get_dataset_info` + `get_train_iterator` + the first batch for
   `records:<dir>` and for `folder:<dir>` (imports not included).
2. Input rate: `--rate_images` photo-like 500×375 JPEGs (crops of the photos in
   ../shared/data/images, else smooth noise) read at 224 px with the training augmentation
   (decode, Inception crop, resize, flip), batch 64, for each `--workers` count, records and
   folder, in img/s over 20 batches after 3 of warm-up.

Prints one table per part; the machine's kind (AVX512-BF16 or not) is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO.parent / "shared" / "data" / "images"
CLASSES = 100
RATE_BATCH, RATE_WARMUP, RATE_BATCHES = 64, 3, 20


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 only (no AVX512-BF16)"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in flags.splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} cores, {model}, {kind}"


def make_tiny_folder(root: Path, count: int) -> None:
    """`count` 16×12 JPEGs in CLASSES classes; every 100th in test/ (count ≥ 100 × CLASSES)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (256, 12, 16, 3), dtype=np.uint8)
    encoded = []
    for pixels in palette:
        path = root / "_tmp.jpg"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        encoded.append(path.read_bytes())
    os.remove(root / "_tmp.jpg")
    made = set()
    for i in range(count):
        split = "test" if i % 100 == 0 else "train"
        label = (i // 100 + (0 if split == "test" else i)) % CLASSES
        directory = root / split / f"c{label:03d}"
        if directory not in made:
            directory.mkdir(parents=True, exist_ok=True)
            made.add(directory)
        (directory / f"{i:07d}.jpg").write_bytes(encoded[i % len(encoded)])


def make_photo_folder(root: Path, count: int) -> None:
    """`count` 500×375 JPEGs (quality 90) cropped and flipped from the shared photos; every 50th
    in test/ (count ≥ 500)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = (
        [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*"))] if PHOTOS.exists() else []
    )
    for i in range(count):
        split = "test" if i % 50 == 0 else "train"
        directory = root / split / f"c{(i // 50 if split == 'test' else i) % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        if photos:
            photo = photos[i % len(photos)]
            scale = rng.uniform(1.0, 1.6) * max(500 / photo.width, 375 / photo.height)
            big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
            left = rng.integers(0, big.width - 500 + 1)
            top = rng.integers(0, big.height - 375 + 1)
            image = big.crop((left, top, left + 500, top + 375))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        image.save(directory / f"{i:06d}.jpg", quality=90)


def prepare(folder: Path, out: Path) -> dict:
    from vit_jax import prepare_data

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare_data.prepare(
        prepare_data.Options(str(folder), str(out)), log=lambda line: None
    )
    seconds = time.perf_counter() - start
    files = sum(s["num_records"] for s in manifest["splits"].values())
    disk = sum(p.stat().st_size for p in out.iterdir())
    return {"seconds": seconds, "files": files, "disk_bytes": disk}


def startup(dataset: str) -> float:
    """Seconds from the calls to the first batch, in a fresh process (imports excluded)."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
from vit_jax import input_pipeline
start = time.perf_counter()
input_pipeline.get_dataset_info({dataset!r}, train_split="train", test_split="test")
batches = input_pipeline.get_train_iterator({dataset!r}, "train", image_size=16,
    global_batch_size=64, local_device_count=1, seed=0)
next(batches)
print(json.dumps(time.perf_counter() - start))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def rate(dataset: str, workers: int) -> float:
    from vit_jax import input_pipeline

    batches = input_pipeline.get_train_iterator(
        dataset,
        "train",
        image_size=224,
        global_batch_size=RATE_BATCH,
        local_device_count=1,
        seed=0,
        num_workers=workers,
    )
    for _ in range(RATE_WARMUP):
        next(batches)
    start = time.perf_counter()
    for _ in range(RATE_BATCHES):
        next(batches)
    seconds = time.perf_counter() - start
    del batches
    return RATE_BATCHES * RATE_BATCH / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,200000")
    parser.add_argument("--rate_images", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--root", default="/tmp/vit_jax_input_bench")
    args = parser.parse_args()
    root = Path(args.root)
    print(f"machine: {machine()}")

    print(
        "\n| images | prepare s | files/s | records MiB | start-up records s | start-up folder s |"
    )
    print("|-------:|----------:|--------:|------------:|-------------------:|------------------:|")
    for size in (int(s) for s in args.sizes.split(",") if s):
        folder, out = root / f"tiny{size}", root / f"tiny{size}_records"
        if not folder.exists():
            make_tiny_folder(folder, size)
        prepared = prepare(folder, out)
        records_s = startup(f"records:{out}")
        folder_s = startup(f"folder:{folder}")
        files_per_s = prepared["files"] / prepared["seconds"]
        print(
            f"| {size:,} | {prepared['seconds']:.1f} | {files_per_s:,.0f}"
            f" | {prepared['disk_bytes'] / 2**20:,.1f} | {records_s:.2f} | {folder_s:.2f} |",
            flush=True,
        )

    if args.rate_images:
        folder, out = root / "photos", root / "photos_records"
        if not folder.exists():
            make_photo_folder(folder, args.rate_images)
        prepared = prepare(folder, out)
        mib = prepared["disk_bytes"] / 2**20
        print(
            f"\n{prepared['files']:,} 500×375 JPEGs ({mib:,.1f} MiB of records) prepared in "
            f"{prepared['seconds']:.1f} s ({prepared['files'] / prepared['seconds']:,.0f} files/s)"
        )
        print("\n| input @224, batch 64 | workers | img/s |")
        print("|----------------------|--------:|------:|")
        for workers in (int(w) for w in args.workers.split(",")):
            for name, dataset in (("records", f"records:{out}"), ("folder", f"folder:{folder}")):
                print(f"| {name} | {workers} | {rate(dataset, workers):,.1f} |", flush=True)


if __name__ == "__main__":
    main()
