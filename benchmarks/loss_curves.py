"""Train loss of the same short run in float32, bfloat16 compute and bf16 matmuls, side by side.

    python benchmarks/loss_curves.py --steps=1000 --log_every=100

The run is the offline main job's pretraining phase (`configs/default.py`: a small ViT on the
embedded digits at 16 px, AdamW), shortened to `--steps`; both runs start from the same seed and
see the same batches. The table shows the window-mean train loss at every `--log_every` steps and
the final test accuracy, so a reader can see whether bf16 compute (`compute_dtype`, float32
params) and bf16 matmuls with float32 activations (`matmul_dtype`) train like float32. Not a
test: the numbers are reported in benchmarks/RESULTS.md.
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

# Column name → config overrides; the first is the baseline the others are compared with.
RUNS = {
    "float32": {},
    "bfloat16": {"compute_dtype": "bfloat16"},
    "bf16 matmuls": {"matmul_dtype": "bfloat16"},
}
_LOSS = re.compile(r"\[(\d+)\] .*train/loss=([-\d.e+]+)")


def loss_curve(log_text: str) -> dict[int, float]:
    """{step: train loss} from the lines the metric writer put in train.log."""
    return {int(step): float(loss) for step, loss in _LOSS.findall(log_text)}


def run(options: dict, steps: int, log_every: int, workdir: str) -> tuple[dict, float]:
    config = default.get_config().pretrain
    config.update(
        **options,
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
        for i, (name, options) in enumerate(RUNS.items()):
            curves[name], accuracy[name] = run(
                options, args.steps, args.log_every, str(Path(root, str(i)))
            )
    base, *others = RUNS
    print(f"| step | {' | '.join(RUNS)} | {' | '.join(f'{o} − {base}' for o in others)} |")
    print("|-----:|" + "------:|" * (2 * len(RUNS) - 1))
    for step in sorted(curves[base]):
        values = [curves[name].get(step, float("nan")) for name in RUNS]
        deltas = [v - values[0] for v in values[1:]]
        print(
            f"| {step} | {' | '.join(f'{v:.4f}' for v in values)} | "
            f"{' | '.join(f'{d:+.4f}' for d in deltas)} |"
        )
    values = [accuracy[name] for name in RUNS]
    print(
        f"| test accuracy | {' | '.join(f'{v:.4f}' for v in values)} | "
        f"{' | '.join(f'{v - values[0]:+.4f}' for v in values[1:])} |"
    )


if __name__ == "__main__":
    main()
