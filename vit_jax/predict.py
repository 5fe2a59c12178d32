"""Prediction: a checkpoint and image files → the top-k classes (or a regression's values).

    python -m vit_jax.predict --checkpoint=ViT-B_16.npz --model=ViT-B_16 \
        --labels=ilsvrc2012_wordnet_lemmas.txt [--top_k=5] [--json] IMAGE...

This module owns turning a checkpoint into a model ready for prediction (`load_for_prediction`:
the class count comes from the checkpoint's head, `pre_logits` from the checkpoint, the input
resolution from its position table), the jitted forward pass in fixed-size padded batches
(`Predictor`, one compilation per batch shape), top-k classification of image files with one
error per unreadable file (`classify`), labels files, and the command line (`main`). It does not
own the checkpoint format (`vit_jax.checkpoint`), what the checkpoint's shapes say (class count,
patch grid, resolution: `vit_jax.checkpoint_geometry`), the models (`vit_jax.models`) or the
preprocessing, which is the training pipeline's evaluation preprocessing
(`input_pipeline.eval_image`: resize, or resize-small + centre crop, to [-1, 1]).

`--checkpoint` is a released-format `.npz`, or a training workdir: its `params.npz`, or, for a
multi-phase run (`<workdir>/<phase>/params.npz`), the phase that ran last (see
`resolve_checkpoint`). A regression run's checkpoint (its `task.json` says so) prints each
image's values and, with `--csv=submission.csv`, writes `Id,<target>` rows
(`vit_jax.predict_regression`).

The command line uses argparse with the parser built by `build_parser` (as `vit_jax.demo`
does), so importing this module as a library (notebooks, `vit_jax.attention`) defines no
global flags.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from vit_jax import native_notices  # isort: skip  (before jax: its native log level)

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

with native_notices.hidden_for_command(__name__):  # these import TensorFlow
    from vit_jax import (
        checkpoint,
        checkpoint_geometry,
        input_pipeline,
        predict_regression,
        weights_info,
    )

PARAMS_FILE = checkpoint.PARAMS_FILE  # what a training workdir (or each phase of one) holds
IMAGENET1K_LABELS_URL = "https://storage.googleapis.com/bit_models/ilsvrc2012_wordnet_lemmas.txt"
IMAGENET21K_LABELS_URL = "https://storage.googleapis.com/bit_models/imagenet21k_wordnet_lemmas.txt"
DEFAULT_BATCH_SIZE = 8

Params = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Public interface: loading.


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The `.npz` to load for `path` (a file, a workdir or a multi-phase workdir).

    `checkpoint.resolve_params_file`, which fine-tuning's `pretrained` uses too.
    """
    return checkpoint.resolve_params_file(path)


def load_params(path: str | os.PathLike) -> Params:
    """`checkpoint.load` of `resolve_checkpoint(path)` (its errors are the clear ones)."""
    return checkpoint.load(resolve_checkpoint(path))


def load_for_prediction(
    checkpoint_path: str | os.PathLike,
    model_name: str,
    *,
    image_size: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, Params, int]:
    """(model, params, image_size) for a checkpoint (file or workdir) and a zoo model name.

    See `prepare_for_prediction`; `overrides` are `models.get_model` overrides.
    """
    model, params, size = prepare_for_prediction(
        load_params(checkpoint_path), model_name, image_size=image_size, **overrides
    )
    check_input_norm(checkpoint_path, model)
    return model, params, size


def check_input_norm(checkpoint_path: str | os.PathLike, model: nn.Module) -> None:
    """The file's recorded input normalisation (if any) must be the model's (`weights_info`)."""
    weights_info.check_input_norm(
        resolve_checkpoint(checkpoint_path),
        getattr(model, "input_norm", weights_info.DEFAULT_INPUT_NORM),
        f"model {getattr(model, 'model_name', None) or type(model).__name__!r}",
    )


# (model, params, image_size) for loaded params and a zoo name; distillation's teacher uses it
# too, so it lives with the other checkpoint-geometry helpers.
prepare_for_prediction = checkpoint_geometry.model_for_checkpoint


def read_labels(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names, one per line, checked against the head size (an error names both numbers).

    The standard files: ImageNet-1k `IMAGENET1K_LABELS_URL` (1,000 lines), ImageNet-21k
    `IMAGENET21K_LABELS_URL` (21,843 lines).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            names = f.read().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"Cannot read labels file {path!r}: {e.strerror or e}.") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"Labels file {path!r} is not UTF-8 text ({e.reason}).") from None
    if len(names) != num_classes:
        raise ValueError(
            f"Labels file {path!r} has {len(names)} lines, but the checkpoint's head has "
            f"{num_classes} classes. Give one class name per line, in the head's order (ImageNet-"
            f"1k: {IMAGENET1K_LABELS_URL}, ImageNet-21k: {IMAGENET21K_LABELS_URL})."
        )
    return names


# ----------------------------------------------------------------------------------------------
# Public interface: running.


class Predictor:
    """The jitted forward pass over fixed-size batches (the last one zero-padded).

    Every call with images of one shape reuses one compiled function: `traces` counts how
    often the forward pass was traced (once per distinct image shape).
    """

    def __init__(
        self, model: nn.Module, params: Mapping[str, Any], batch_size: int = DEFAULT_BATCH_SIZE
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model = model
        self.batch_size = batch_size
        self.params = jax.device_put(params)
        self.traces = 0

        def forward(params, images, inputs):
            self.traces += 1  # Python side effect: runs once per trace, not per call
            return model.apply({"params": params}, images, train=False, **inputs)

        self._forward = jax.jit(forward)

    def __call__(
        self, images: np.ndarray | Sequence[np.ndarray], features: np.ndarray | None = None
    ) -> np.ndarray:
        """Outputs [N, classes] (float32, NumPy) of images [N, H, W, 3] in [-1, 1].

        `features` [N, F]: the per-image features of a head trained with them.
        """
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected images of shape [N, H, W, 3], got {images.shape}.")
        outputs = []
        for start in range(0, len(images), self.batch_size):
            parts = {"images": images[start : start + self.batch_size]}
            if features is not None:
                parts["features"] = np.asarray(features, np.float32)[
                    start : start + len(parts["images"])
                ]
            real = len(parts["images"])
            for key, part in parts.items():
                if real < self.batch_size:
                    padding = np.zeros((self.batch_size - real, *part.shape[1:]), np.float32)
                    parts[key] = np.concatenate([part, padding])
            inputs = {"features": parts["features"]} if features is not None else {}
            outputs.append(np.asarray(self._forward(self.params, parts["images"], inputs))[:real])
        if not outputs:
            return np.zeros((0, self.model.num_classes), np.float32)
        return np.concatenate(outputs)

    def over_files(
        self,
        paths: Sequence[str],
        load: Callable[[str], np.ndarray],
        features: np.ndarray | None = None,
    ) -> list[tuple[np.ndarray | None, str | None]]:
        """(outputs, None) or (None, error message) per image file, in order.

        Files are loaded `batch_size` at a time, so memory does not grow with their number;
        a file `load` cannot read (`ImageError`) is reported and the others still predicted.
        `features` [N, F] go with the files of the same index.
        """
        rows: list[tuple[np.ndarray | None, str | None]] = []
        pending: list[int] = []
        images: list[np.ndarray] = []

        def flush():
            if pending:
                extra = None if features is None else np.asarray(features)[pending]
                for index, out in zip(pending, self(np.stack(images), extra), strict=True):
                    rows[index] = (out, None)
                pending.clear()
                images.clear()

        for index, path in enumerate(paths):
            rows.append((None, None))
            try:
                images.append(load(path))
            except ImageError as e:
                rows[index] = (None, str(e))
                continue
            pending.append(index)
            if len(pending) == self.batch_size:
                flush()
        flush()
        return rows


def predict(
    model: nn.Module,
    params: Mapping[str, Any],
    images: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """Logits [N, classes] of preprocessed images [N, H, W, 3] (one-shot `Predictor`)."""
    images = np.asarray(images, np.float32)
    return Predictor(model, params, batch_size or max(len(images), 1))(images)


def probabilities(logits: np.ndarray, *, sigmoid: bool = False) -> np.ndarray:
    """Softmax over classes (float64), or per-class sigmoid for sigmoid-trained heads."""
    logits = np.asarray(logits, np.float64)
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the k largest entries per row, largest first (ties: lower index)."""
    k = min(k, probs.shape[-1])
    indices = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return indices, np.take_along_axis(probs, indices, axis=-1)


def load_image(path: str, image_size: int, eval_crop: str = "resize") -> np.ndarray:
    """One file, preprocessed as in evaluation; an unreadable file raises `ImageError`."""
    if eval_crop not in input_pipeline.EVAL_CROPS:
        valid = ", ".join(input_pipeline.EVAL_CROPS)
        raise ValueError(f"Unknown eval_crop {eval_crop!r}; valid values: {valid}.")
    try:
        return input_pipeline.eval_image(path, image_size, eval_crop)
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # What Pillow raises for non-image, truncated or corrupt files.
        raise ImageError(path, f"not a readable image ({type(e).__name__}: {e})") from None


class ImageError(ValueError):
    """An image file that cannot be read; the other images of a run are still predicted."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path


def classify(
    predictor: Predictor,
    paths: Iterable[str],
    *,
    image_size: int,
    k: int = 5,
    labels: Sequence[str] | None = None,
    eval_crop: str = "resize",
    sigmoid: bool = False,
) -> list[dict[str, Any]]:
    """Top-k classes of each image file, in the order given.

    Each result is `{'image': path, 'top_k': [{'class': index, 'label': name or None,
    'prob': p}, ...]}`, or `{'image': path, 'error': message}` for a file that cannot be read.
    Images are read `predictor.batch_size` at a time, so memory does not grow with their number.
    """
    paths = list(paths)
    rows = predictor.over_files(paths, lambda path: load_image(path, image_size, eval_crop))
    results: list[dict[str, Any]] = []
    for path, (logits, error) in zip(paths, rows, strict=True):
        result: dict[str, Any] = {"image": path}
        if error is not None:
            result["error"] = error
        else:
            indices, values = top_k(probabilities(logits[None], sigmoid=sigmoid), k)
            result["top_k"] = [
                {"class": int(i), "label": labels[i] if labels else None, "prob": float(p)}
                for i, p in zip(indices[0], values[0], strict=True)
            ]
        results.append(result)
    return results


def format_results(results: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text report: per image its path, then one line per class (prob, index, name)."""
    lines = []
    for result in results:
        if "error" in result:
            continue
        lines.append(result["image"])
        for entry in result["top_k"]:
            name = f"  {entry['label']}" if entry["label"] is not None else ""
            lines.append(f"  {entry['prob']:.4f}  {entry['class']:>5d}{name}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_overrides(text: str) -> dict[str, Any]:
    """argparse type of --overrides: a JSON object (a clear usage error otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vit_jax.predict",
        description="Top-k classes of image files with a ViT / hybrid / Mixer checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="Released-format .npz, or a training workdir (its params.npz, or the last phase's).",
    )
    parser.add_argument("--model", required=True, help="Zoo model name, e.g. ViT-B_16.")
    parser.add_argument(
        "--labels",
        help=(
            "Class names, one per line, in the head's order (default for a training workdir: "
            "the class names it trained on, from its task.json). ImageNet-1k: "
            f"{IMAGENET1K_LABELS_URL}; ImageNet-21k: {IMAGENET21K_LABELS_URL}."
        ),
    )
    parser.add_argument("--top_k", type=int, default=5, help="Classes shown per image.")
    parser.add_argument(
        "--image_size",
        type=int,
        help="Input resolution (default: a training workdir's, from its task.json, else the "
        "checkpoint's: its position table; a Swin file's window × patch × 2^(stages − 1)).",
    )
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="Images per compiled call."
    )
    parser.add_argument(
        "--eval_crop",
        choices=input_pipeline.EVAL_CROPS,
        help="Evaluation preprocessing the model was evaluated with (config.eval_crop; default: "
        "a workdir's, from its task.json, else 'resize').",
    )
    parser.add_argument(
        "--overrides",
        type=parse_overrides,
        default={},
        help='Model overrides as JSON, e.g. \'{"hidden_size": 64, "patches": {"size": [4, 4]}}\'.',
    )
    parser.add_argument(
        "--sigmoid",
        action="store_true",
        help="Per-class sigmoid (sigmoid-trained heads; a workdir's task.json says so itself).",
    )
    parser.add_argument(
        "--csv",
        help="Regression checkpoints: also write <id>,<target> rows to this file (a Kaggle "
        "submission; the id is the image's file name without its extension).",
    )
    parser.add_argument(
        "--features_csv",
        help="Regression heads trained with feature columns: the CSV holding each image's "
        "features by id (e.g. Kaggle's test.csv).",
    )
    parser.add_argument(
        "--task_info",
        help="The task.json of the run (default: the one beside the checkpoint's params file).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON document.")
    parser.add_argument("--verbose", action="store_true", help="Show tracebacks of errors.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="Image files.")
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    """Runs the command line; returns the exit code (1 when any image failed, 2 on setup errors)."""
    stdout = stdout or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        setup = _setup(args)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    predictor, image_size, labels, info = setup
    args.eval_crop = args.eval_crop or (info or {}).get("eval_crop") or "resize"
    if info is not None and info["task"] == "regression":
        load = functools.partial(load_image, eval_crop=args.eval_crop)
        return predict_regression.run(args, predictor, image_size, info, load, stdout)
    results = classify(
        predictor,
        args.images,
        image_size=image_size,
        k=args.top_k,
        labels=labels,
        eval_crop=args.eval_crop,
        sigmoid=args.sigmoid or (info or {}).get("loss") == "sigmoid_xent",
    )
    errors = [r["error"] for r in results if "error" in r]
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1), file=stdout)
    else:
        print(format_results(results), file=stdout)
    return 1 if errors else 0


def _setup(
    args: argparse.Namespace,
) -> tuple[Predictor, int, list[str] | None, dict[str, Any] | None]:
    """Everything that can fail before any image is read: checkpoint, labels, model, sizes."""
    if args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    info = predict_regression.read_task_info(args.checkpoint, args.task_info)
    regression = info is not None and info["task"] == "regression"
    for flag in ("csv", "features_csv"):
        if getattr(args, flag) and not regression:
            raise ValueError(f"--{flag} applies to regression checkpoints; this one classifies.")
    params = load_params(args.checkpoint)
    num_classes = checkpoint_geometry.head_size(params)
    labels = read_labels(args.labels, num_classes) if args.labels else None
    trained_names = (info or {}).get("class_names")
    if labels is None and not regression and trained_names and len(trained_names) == num_classes:
        labels = list(trained_names)  # the class names the run trained on (its task.json)
    model, params, image_size = prepare_for_prediction(
        params,
        args.model,
        image_size=args.image_size or (info or {}).get("image_size"),  # the run's, if any
        num_features=int(info.get("num_features", 0)) if regression else 0,
        **args.overrides,
    )
    check_input_norm(args.checkpoint, model)
    batch_size = min(args.batch_size, len(args.images))
    return Predictor(model, params, batch_size), image_size, labels, info


if __name__ == "__main__":
    sys.exit(main())
