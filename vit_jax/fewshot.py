"""Few-shot linear evaluation: how good frozen features are, without a fine-tuning run.

    python -m vit_jax.fewshot --checkpoint=WORKDIR_OR_NPZ --model=ViT-B_16 \
        --dataset=cifar10 [--train_split=train --test_split=test --image_size=224] \
        [--shots=1,5,10,25 --seeds=3 --l2_reg=1024]

The method is big_vision's `fewshot_lsr`: the pooled `pre_logits` features of a train and a
test split, k examples per class drawn from the train features, whitened with those examples'
mean and standard deviation, and a ridge regression onto ±1 one-hot targets solved in closed
form; the accuracy is the argmax on the test features. Each k is drawn `seeds` times and the
accuracies averaged. It needs no training, so it reads representation quality every few
thousand steps of a pretraining run (`config.fewshot.every`, into TensorBoard as
`fewshot/<k>shot`) or of any checkpoint from the command line.

Every example of both splits is counted once (the evaluation pipeline's padded batches), and
with several processes the features are gathered before solving, so every process computes
the same numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vit_jax import native_notices  # isort: skip  (before jax: its native log level)

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint, checkpoint_geometry, encoder_tree

SHOTS = (1, 5, 10, 25)
L2_REG = 2.0**10  # big_vision's default ridge strength for whitened features
STD_EPS = 1e-5  # added to the per-feature standard deviation before whitening

Features = tuple[np.ndarray, np.ndarray]  # (features [n, D], integer labels [n])


def ridge_accuracy(
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    l2_reg: float = L2_REG,
) -> float:
    """Test accuracy of the closed-form ridge regression of ±1 one-hot targets on `x`."""
    x, x_test = np.asarray(x, np.float64), np.asarray(x_test, np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + STD_EPS
    x, x_test = (x - mean) / std, (x_test - mean) / std
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0
    w = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ targets)
    return float(np.mean(np.argmax(x_test @ w, axis=1) == np.asarray(y_test)))


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class (without replacement), seeded."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(
                f"Few-shot evaluation needs {shots} training examples of every class, but "
                f"class {c} has {len(members)}; use smaller --shots / fewshot.shots or a "
                "larger train split."
            )
        picked.append(rng.choice(members, shots, replace=False))
    return np.concatenate(picked)


def fewshot_accuracies(
    train: Features,
    test: Features,
    num_classes: int,
    shots: Sequence[int] = SHOTS,
    seeds: int = 3,
    l2_reg: float = L2_REG,
) -> dict[str, float]:
    """`{'<k>shot': mean accuracy over seeds, '<k>shot_std': their spread}` for each k."""
    results = {}
    for k in shots:
        accuracies = []
        for seed in range(seeds):
            picked = sample_shots(train[1], k, num_classes, seed)
            x, y = train[0][picked], train[1][picked]
            accuracies.append(ridge_accuracy(x, y, *test, num_classes, l2_reg))
        results[f"{k}shot"] = float(np.mean(accuracies))
        results[f"{k}shot_std"] = float(np.std(accuracies))
    return results


# ----------------------------------------------------------------------------------------------
# Features of a dataset split.


def features_model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The feature extractor's params: a pretraining run's encoder, any tree without its head."""
    encoder, _ = encoder_tree.encoder_params(params)
    return {k: v for k, v in encoder.items() if k not in checkpoint.FRESH_HEAD_KEYS}


def split_features(
    features_fn: Callable[[Any, jax.Array], jax.Array], params: Any, batches: Iterable
) -> tuple[np.ndarray, np.ndarray, int]:
    """(pooled features, integer labels, class count) of every real example of `batches`,
    those of all processes.

    `features_fn` is pmap'd: (replicated params, [devices, batch, H, W, 3] images) → features.
    """
    chunks, labels, masks, num_classes = [], [], [], 0
    for batch in batches:
        chunks.append(np.asarray(features_fn(params, batch["image"])))
        one_hot = np.asarray(batch["label"])
        num_classes = one_hot.shape[-1]
        labels.append(np.argmax(one_hot, axis=-1))
        masks.append(np.asarray(batch["mask"]))
    x, y, mask = (np.concatenate([a.reshape(-1, *a.shape[2:]) for a in parts])
                  for parts in (chunks, labels, masks))  # fmt: skip
    if jax.process_count() > 1:  # every process pads to the same number of batches
        from jax.experimental import multihost_utils

        x, y, mask = (np.asarray(multihost_utils.process_allgather(a)) for a in (x, y, mask))
        x, y, mask = (a.reshape(-1, *a.shape[2:]) for a in (x, y, mask))
    keep = mask.reshape(-1) > 0
    return x.reshape(len(keep), -1)[keep], y.reshape(-1)[keep], num_classes


class Evaluator:
    """Few-shot accuracies of a training run's params on `config.fewshot`'s dataset splits.

    Built once per run: `batches(split)` gives re-iterable evaluation batches, and the pmap'd
    feature extractor (`features_model`: the run's model without a head, pooled as configured)
    compiles once.
    """

    def __init__(self, options: ml_collections.ConfigDict, features_model: Any, batches):
        self.shots, self.seeds, self.l2_reg = tuple(options.shots), options.seeds, options.l2_reg
        self.features_fn = jax.pmap(
            lambda p, x: features_model.apply({"params": p}, x, train=False)
        )
        self.train_batches = batches(options.train_split)
        self.test_batches = batches(options.test_split)

    def __call__(self, replicated_params: Any) -> dict[str, float]:
        """The accuracies; {} (with one warning) when a class has fewer examples than the
        largest k: a side evaluation does not stop the training run."""
        params = features_model_params(replicated_params)
        *train, num_classes = split_features(self.features_fn, params, self.train_batches)
        *test, _ = split_features(self.features_fn, params, self.test_batches)
        try:
            return fewshot_accuracies(
                tuple(train), tuple(test), num_classes, self.shots, self.seeds, self.l2_reg
            )
        except ValueError as e:
            logging.getLogger(__name__).warning("Few-shot evaluation skipped: %s", e)
            return {}


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError for `config.fewshot` options out of range (before any work)."""
    options = config.fewshot
    if options.every < 0:
        raise ValueError(f"fewshot.every must be ≥ 0 (0 = off), got {options.every}.")
    shots = tuple(options.shots)
    if not shots or any(not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(
            f"fewshot.shots must be positive integers, e.g. (1, 5, 10, 25); got {shots}."
        )
    if options.seeds < 1:
        raise ValueError(f"fewshot.seeds must be ≥ 1, got {options.seeds}.")
    if options.dataset and not (options.train_split and options.test_split):
        raise ValueError(
            f"fewshot.dataset={options.dataset!r} needs fewshot.train_split and "
            "fewshot.test_split (e.g. 'train' and 'test'); without a dataset they default to "
            "the run's splits."
        )
    if not options.l2_reg > 0:
        raise ValueError(f"fewshot.l2_reg must be > 0, got {options.l2_reg}.")


# ----------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit_jax.fewshot",
        description="Few-shot linear accuracy (closed-form ridge) of a checkpoint's features.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="A .npz (released, fine-tuned, a pretraining run's params or encoder.npz) or a "
        "training workdir.",
    )
    parser.add_argument("--model", required=True, help="Zoo model name of the encoder.")
    parser.add_argument("--overrides", type=_overrides, default={}, help="Model overrides as JSON.")
    parser.add_argument("--dataset", default="sklearn_digits", help="As config.dataset.")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--data_dir", default="", help="tfds data_dir ('' = tfds default).")
    parser.add_argument(
        "--image_size", type=int, help="Input resolution (default: the checkpoint's)."
    )
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="e.g. 1,5,10,25")
    parser.add_argument("--seeds", type=int, default=3, help="Draws of the shots per k.")
    parser.add_argument("--l2_reg", type=float, default=L2_REG)
    parser.add_argument("--batch_size", type=int, default=64, help="Feature batch (global).")
    parser.add_argument("--json", action="store_true", help="Print one JSON document.")
    parser.add_argument("--verbose", action="store_true", help="Show tracebacks of errors.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        results = _run(args)
    except (OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for k in _parse_shots(args.shots):
            mean, std = results[f"{k}shot"], results[f"{k}shot_std"]
            print(f"{k:>3}-shot accuracy {mean:.4f} ± {std:.4f} ({args.seeds} seeds)")
    return 0


def _overrides(text: str) -> dict[str, Any]:
    """argparse type of --overrides: predict's JSON object, without num_classes."""
    with native_notices.hidden_for_command(__name__):  # predict imports TensorFlow
        from vit_jax import predict

    overrides = predict.parse_overrides(text)
    if "num_classes" in overrides:
        raise argparse.ArgumentTypeError("no num_classes: the features model has no head")
    return overrides


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--shots must be comma-separated integers, got {text!r}.") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be positive integers, got {text!r}.")
    return shots


def _run(args: argparse.Namespace) -> dict[str, float]:
    with native_notices.hidden_for_command(__name__):  # TensorFlow: after the flags are parsed
        from vit_jax import input_pipeline, steps

    shots = _parse_shots(args.shots)
    overrides = args.overrides
    params = checkpoint.load(checkpoint.resolve_params_file(args.checkpoint))
    params = features_model_params(params)
    model, params, image_size = checkpoint_geometry.model_for_checkpoint(
        params, args.model, image_size=args.image_size, num_classes=0, **overrides
    )
    devices = jax.local_device_count()
    batch_size = -(-args.batch_size // jax.device_count()) * jax.device_count()

    def batches(split: str):
        return input_pipeline.get_eval_iterator(
            args.dataset,
            split,
            image_size=image_size,
            global_batch_size=batch_size,
            local_device_count=devices,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            data_dir=args.data_dir or None,
        )

    features_fn = jax.pmap(lambda p, x: model.apply({"params": p}, x, train=False))
    replicated = steps.replicate(params)
    *train, num_classes = split_features(features_fn, replicated, batches(args.train_split))
    *test, _ = split_features(features_fn, replicated, batches(args.test_split))
    return fewshot_accuracies(
        tuple(train), tuple(test), num_classes, shots, args.seeds, args.l2_reg
    )


if __name__ == "__main__":
    sys.exit(main())
