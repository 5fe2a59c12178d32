"""Self-supervised pretraining on the embedded digits: MAE and masked patches against scratch.

    python benchmarks/ssl_digits.py [--workdir=/tmp/ssl_digits] [--pretrain_steps=1500] \
        [--finetune_steps=300] [--seeds=2]

One encoder (the default job's: width 64, 2 layers, 4 heads, 4 px patches at 16 px) is
pretrained without labels on the digits' train split, by MAE (`task='mae'`, a 1-block decoder
of width 64) and by masked patch prediction (`task='mpp'`, 3-bit mean colours), or not at all
(random init). Then, for each:
- few-shot linear accuracy of the frozen features (`vit_jax.fewshot`: 1/5/10/25 labelled
  images per class drawn from the train split, 5 draws each, tested on the 360 test images);
- fine-tuning with the labels of 10 % of the train split only (`train[:10%]`, 144 images;
  AdamW, the same steps for all three) and its test accuracy.
Prints one row per pretraining and seed; the numbers are in benchmarks/RESULTS.md.
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
from vit_jax import checkpoint, run_config, run_data, steps, train

IMAGE_SIZE = 16
ENCODER = {
    "hidden_size": 64,
    "patches": {"size": [4, 4]},
    "transformer": {"mlp_dim": 128, "num_heads": 4, "num_layers": 2, "dropout_rate": 0.0},
}
FEW_LABELS = "train[:10%]"
SHOTS = (1, 5, 10, 25)


def base_config(steps_: int, seed: int, **fields):
    c = common.get_config()
    c.dataset = "sklearn_digits"
    c.model = common.model_config("testing", **ENCODER)
    c.update(image_size=IMAGE_SIZE, batch_size=128, optimizer="adamw", weight_decay=0.05)
    c.update(total_steps=steps_, warmup_steps=max(steps_ // 20, 1), seed=seed)
    c.update(log_every=max(steps_ // 2, 1), checkpoint_every=steps_, eval_every=0)
    for key, value in fields.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def pretrain_config(task: str, steps_: int, seed: int):
    if task == "mae":  # MAE's AdamW betas; lr 1.5e-4 · 128/256 is slow at this scale
        return base_config(
            steps_, seed, task="mae", loss="mse", base_lr=1e-3, adam_b2=0.95,
            **{"mae.decoder_width": 64, "mae.decoder_depth": 1, "mae.decoder_heads": 4},
        )  # fmt: skip
    return base_config(steps_, seed, task="mpp", loss="softmax_xent", base_lr=1e-3)


def fewshot_of(config, params) -> dict[str, float]:
    """Few-shot accuracies of `params`' pooled features (shots from the train split)."""
    config.fewshot.update(every=1, shots=SHOTS, seeds=5)
    return run_data.fewshot_evaluator(config)(steps.replicate(params))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/ssl_digits")
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for seed in range(args.seeds):
        for start in ("scratch", "mae", "mpp"):
            workdir = os.path.join(args.workdir, f"{start}_{seed}")
            began = time.time()
            pretrained = ""
            if start == "scratch":
                init_config = base_config(100, seed)
                model = run_config.make_model(init_config, num_classes=0)
                schedule = run_config.make_schedule(init_config)
                params = train.create_state(init_config, model, schedule).params
            else:
                config = pretrain_config(start, args.pretrain_steps, seed)
                train.train_and_evaluate(config, os.path.join(workdir, "pretrain"))
                pretrained = os.path.join(workdir, "pretrain")
                params = checkpoint.load(os.path.join(pretrained, "encoder.npz"))
            shots = fewshot_of(base_config(100, seed), params)
            tune = base_config(
                args.finetune_steps, seed, train_split=FEW_LABELS, base_lr=1e-3,
                pretrained=pretrained,
            )  # fmt: skip
            _, tuned = train.train_and_evaluate(tune, os.path.join(workdir, "finetune"))
            row = {
                "start": start,
                "seed": seed,
                **{k: round(v, 4) for k, v in shots.items()},
                "finetuned_accuracy": round(tuned["accuracy"], 4),
                "seconds": round(time.time() - began),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
