"""DeiT distillation on the embedded digits: a teacher first, then students with and without it.

    python benchmarks/distill_digits.py [--workdir=/tmp/distill_digits] [--student_steps=300]

The teacher is the default job's model (width 64, 2 layers, 4 px patches) trained from scratch at
16 px; the students are a smaller ViT (width 32, 1 layer, 4 heads) trained for the same number of
steps with the same recipe (AdamW, cosine, mixup 0.2; with `--deit_augment` DeiT's mixup 0.8,
cutmix 1.0 and label smoothing 0.1): as a plain classifier (no teacher), and with the teacher,
hard and soft, once with a distillation token (DeiT) and once on its one head (classic
distillation). Prints one row per run (test accuracy, 360 images); the numbers are in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common
from vit_jax import train

IMAGE_SIZE = 16
TEACHER = {
    "hidden_size": 64,
    "patches": {"size": [4, 4]},
    "transformer": {"mlp_dim": 128, "num_heads": 4, "num_layers": 2, "dropout_rate": 0.0},
}
STUDENT = {
    "hidden_size": 32,
    "patches": {"size": [4, 4]},
    "transformer": {"mlp_dim": 64, "num_heads": 4, "num_layers": 1, "dropout_rate": 0.0},
}


def run_config(model: dict, steps: int, **fields):
    c = common.get_config()
    c.dataset = "sklearn_digits"
    c.model = common.model_config("testing", **model)
    c.update(image_size=IMAGE_SIZE, batch_size=128, optimizer="adamw", base_lr=3e-3)
    c.update(weight_decay=0.03, total_steps=steps, warmup_steps=steps // 20, mixup_alpha=0.2)
    c.update(log_every=max(steps // 2, 1), checkpoint_every=steps)
    for key, value in fields.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/distill_digits")
    parser.add_argument("--teacher_steps", type=int, default=3000)
    parser.add_argument("--student_steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=2, help="Student runs per row (seeds 0…).")
    parser.add_argument(
        "--deit_augment",
        action="store_true",
        help="Students with DeiT's mixing: mixup 0.8, cutmix 1.0, label smoothing 0.1.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []

    def run(name: str, make, seeds: int) -> None:
        accuracies, start = [], time.monotonic()
        for seed in range(seeds):
            config = make(seed)
            workdir = os.path.join(args.workdir, name.replace(" ", "_").replace(",", ""), str(seed))
            _, metrics = train.train_and_evaluate(config, workdir)
            accuracies.append(metrics["accuracy"])
            print(f"{name:28s} seed {seed} {config.total_steps:6d} steps  {accuracies[-1]:.4f}")
        rows.append((name, config.total_steps, accuracies, (time.monotonic() - start) / seeds))

    run("teacher", lambda seed: run_config(TEACHER, args.teacher_steps, seed=seed), 1)
    teacher = {
        "task": "distillation",
        "distill.teacher_model": "testing",
        "distill.teacher_checkpoint": os.path.join(args.workdir, "teacher", "0"),
        "distill.teacher_overrides": json.dumps(TEACHER),
    }
    steps = args.student_steps
    seeds = args.seeds
    mixing = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
    mixing = mixing if args.deit_augment else {}
    run("student, no teacher", lambda seed: run_config(STUDENT, steps, seed=seed, **mixing), seeds)
    distilled = {**STUDENT, "distilled": True}
    for kind in ("hard", "soft"):
        options = {**teacher, "distill.type": kind, **mixing}
        run(
            f"student + dist token, {kind}",
            lambda seed, o=options: run_config(distilled, steps, seed=seed, **o),
            seeds,
        )
        run(
            f"student, one head, {kind}",
            lambda seed, o=options: run_config(STUDENT, steps, seed=seed, **o),
            seeds,
        )
    print("\n| run | steps | test accuracy per seed | mean | wall s per run |")
    print("|---|---|---|---|---|")
    for name, n, accuracies, seconds in rows:
        each = ", ".join(f"{a:.4f}" for a in accuracies)
        mean = sum(accuracies) / len(accuracies)
        print(f"| {name} | {n} | {each} | {mean:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
