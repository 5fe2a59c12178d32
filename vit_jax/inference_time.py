"""Inference throughput of one zoo model: `python -m vit_jax.inference_time --model=ViT-B_16`.

Prints images per second of the jit'd forward pass (`model.apply(train=False)`) on one device,
the median over `--steps` timed calls after a warm-up call (the original ignored its step count).
The model's speed options (`--dtype`, `--attention_impl`, `--scan`) can be set; the full
side-by-side table of training and inference speed, compile time and memory is
`benchmarks/benchmark.py`.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from vit_jax import models, models_vit

_MODEL = flags.DEFINE_string("model", "ViT-B_16", "Zoo model name.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution (pixels).")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per call.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls (after one warm-up call).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", "flax", list(models_vit.ATTENTION_IMPLS), "Attention implementation."
)
_SCAN = flags.DEFINE_bool("scan", False, "Run the encoder blocks with nn.scan.")


def images_per_second(
    model_name: str,
    image_size: int,
    batch: int,
    steps: int,
    **options,
) -> float:
    """Median images/s of `steps` forward calls of `model_name` on random params and images."""
    if steps <= 0 or batch <= 0:
        raise ValueError(f"steps and batch must be > 0, got steps={steps}, batch={batch}.")
    model = models.get_model(model_name, num_classes=1000, **options)
    images = jax.random.uniform(
        jax.random.PRNGKey(0), (batch, image_size, image_size, 3), minval=-1.0, maxval=1.0
    )
    params = jax.jit(lambda r: model.init(r, images[:1], train=False)["params"])(
        jax.random.PRNGKey(1)
    )
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    jax.block_until_ready(forward(params, images))  # compile + warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, images))
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    ips = images_per_second(
        _MODEL.value,
        _IMAGE_SIZE.value,
        _BATCH.value,
        _STEPS.value,
        dtype=jnp.dtype(_DTYPE.value),
        attention_impl=_ATTENTION.value,
        scan=_SCAN.value,
    )
    device = jax.devices()[0]
    print(
        f"{_MODEL.value} @ {_IMAGE_SIZE.value}px, batch {_BATCH.value}, {_DTYPE.value}, "
        f"attention {_ATTENTION.value}, scan {_SCAN.value} on {device.device_kind}: "
        f"{ips:.1f} img/s (median of {_STEPS.value})"
    )


if __name__ == "__main__":
    app.run(main)
