"""Train loss of the same short run in float32 and bfloat16 compute, side by side.

    python benchmarks/loss_curves.py --steps=1000 --log_every=100

The run is the offline main job's pretraining phase (`configs/default.py`: a small ViT on the
embedded digits at 16 px, AdamW), shortened to `--steps`; both runs start from the same seed and
see the same batches. The table shows the window-mean train loss at every `--log_every` steps and
the final test accuracy, so a reader can see whether bf16 compute (float32 params) trains like
float32. Not a test: the numbers are reported in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import default
from vit_jax import train

DTYPES = ("float32", "bfloat16")
_LOSS = re.compile(r"\[(\d+)\] .*train/loss=([-\d.e+]+)")


def loss_curve(log_text: str) -> dict[int, float]:
    """{step: train loss} from the lines the metric writer put in train.log."""
    return {int(step): float(loss) for step, loss in _LOSS.findall(log_text)}


def run(compute_dtype: str, steps: int, log_every: int, workdir: str) -> tuple[dict, float]:
    config = default.get_config().pretrain
    config.update(
        compute_dtype=compute_dtype,
        total_steps=steps,
        warmup_steps=min(config.warmup_steps, steps // 10),
        log_every=log_every,
        eval_every=0,
        checkpoint_every=0,
    )
    _, metrics = train.train_and_evaluate(config, workdir)
    return loss_curve(Path(workdir, train.LOG_FILE).read_text()), metrics["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log_every", type=int, default=100)
    args = parser.parse_args()
    curves, accuracy = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for dtype in DTYPES:
            curves[dtype], accuracy[dtype] = run(
                dtype, args.steps, args.log_every, str(Path(root, dtype))
            )
    print(f"| step | {' | '.join(DTYPES)} | bf16 − fp32 |")
    print("|-----:|" + "------:|" * (len(DTYPES) + 1))
    for step in sorted(curves["float32"]):
        fp32, bf16 = curves["float32"][step], curves["bfloat16"].get(step, float("nan"))
        print(f"| {step} | {fp32:.4f} | {bf16:.4f} | {bf16 - fp32:+.4f} |")
    print(
        f"| test accuracy | {accuracy['float32']:.4f} | {accuracy['bfloat16']:.4f} | "
        f"{accuracy['bfloat16'] - accuracy['float32']:+.4f} |"
    )


if __name__ == "__main__":
    main()
