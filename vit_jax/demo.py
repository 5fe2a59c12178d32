"""A self-contained tour of the model zoo and the released checkpoint format (no network).

    python -m vit_jax.demo --workdir=/tmp/vit_jax_demo

Prints the zoo's parameter counts, writes a small ViT as a released-format `.npz`, reads it back
(checking it is bit-identical), and loads it for fine-tuning at twice the resolution with a new
head (the position table is resampled), and runs the fine-tuning model on a batch of images.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint, models


def parameter_count(name: str, num_classes: int = 1000, image_size: int | None = None) -> int:
    """Exact parameter count of a zoo model, computed without allocating it (at the model's
    `models.default_image_size` unless `image_size` is given)."""
    size = image_size or models.default_image_size(name)
    return count_parameters(models.get_model(name, num_classes=num_classes), size)


def count_parameters(model: Any, image_size: int = 224) -> int:
    """Exact parameter count of any of the package's models, computed without allocating it."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def run(workdir: str, names: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the tour, listing the parameter counts of the zoo models `names` (all by default);
    returns the figures it printed (for tests)."""
    os.makedirs(workdir, exist_ok=True)
    print(f"{'model':24s} {'params (1000 classes, 224 px; 384 for w12)':>44s}")
    for name in models.MODEL_CONFIGS if names is None else names:
        print(f"{name:24s} {parameter_count(name):>44,d}")

    pretrain_model = models.get_model("testing", num_classes=21, representation_size=10)
    params = pretrain_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    params = params["params"]
    path = os.path.join(workdir, "testing_21.npz")
    checkpoint.save(params, path)
    restored = checkpoint.load(path)
    identical = all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True)
    )
    print(f"\nwrote {path} ({os.path.getsize(path):,} bytes); read back bit-identical: {identical}")

    finetune_model = models.get_model("testing", num_classes=5)
    init = finetune_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3)), train=False)
    finetune_params = checkpoint.load_pretrained(
        pretrained_path=path, init_params=init["params"], model_config=models.get_config("testing")
    )
    old = params["Transformer"]["posembed_input"]["pos_embedding"].shape
    new = finetune_params["Transformer"]["posembed_input"]["pos_embedding"].shape
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    logits = finetune_model.apply({"params": finetune_params}, images, train=False)
    print(f"fine-tune load at 64 px: position table {old} → {new}; logits {logits.shape}")
    return {"identical": float(identical), "posemb_rows": float(new[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/vit_jax_demo", help="Where files are written.")
    run(parser.parse_args().workdir)


if __name__ == "__main__":
    main()
