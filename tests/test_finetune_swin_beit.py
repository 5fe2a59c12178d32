"""Swin and BEiT fine-tuned on the embedded digits from converted timm checkpoints, at a higher
resolution than the checkpoint's, then `predict` on image files.

Each test makes a timm model of the zoo's tiny architecture (`testing-swin`: width 32, one stage
of two blocks, window 2, 2 px patches; `testing-beit`: width 64, one block, 16 px patches) with
timm's own random initialisation (no download), saves it as `.safetensors`, converts it with
`python -m vit_jax.timm_weights`, and fine-tunes it with `configs/finetune.py`'s recipe for the
family (AdamW, label smoothing 0.1, drop path; BEiT's layer decay, Swin's gradient clip) at a
new resolution, so `load_pretrained` resamples the relative position tables:
- Swin: checkpoint at 8 px with window 2 (table 3² rows) → 12 px with window 3 (5² rows); the
  6 × 6 grid is four windows, every second block shifted with the attention mask;
- BEiT: checkpoint at 32 px (2 × 2 grid, 3² + 3 rows) → 48 px (3 × 3 grid, 5² + 3 rows).
Shrunk to a test: batch 64, 300 steps, base lr 0.01 (the recipe's 2e-5 is for ImageNet-21k
weights, these are random), no mixup/cutmix and no crop-scale augmentation (`crop_min_area=1`):
in 300 steps they cost most of the accuracy (measured, Swin at lr 0.01 without smoothing or drop
path: 0.38 with the default crop, 0.85 without).

Measured on the AVX2-only kind (2-core AMD EPYC without AVX512; 8 fake devices), 2026-12-07,
config seeds 0, 1, 2: Swin test accuracy 0.792, 0.786, 0.794 (14–15 s each once compiled,
outside pytest); BEiT 0.817, 0.806, 0.822 (9 s). Batch 128 gave Swin 0.806–0.844 and BEiT
0.861–0.869 (AVX512-BF16 kind, 2026-12-03) in about 1.6× the time; 150 steps of batch 128 at
lr 0.01 or 0.02 gave Swin 0.46–0.78. The floors sit 0.086 under the worst seed (31 test
examples); a model that learns nothing scores about 0.1.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from configs import finetune
from tests import _compiled
from tests._torchvision_shim import require_timm
from tests.test_train import DIGITS_TEST
from vit_jax import indexed_sources, predict, timm_weights, train

torch, timm = require_timm()
from safetensors.torch import save_file  # noqa: E402
from timm.models import beit as timm_beit  # noqa: E402
from timm.models import swin_transformer as timm_swin  # noqa: E402

SWIN_FLOOR = 0.70
BEIT_FLOOR = 0.72


def _converted(tmp_path, model, name: str) -> str:
    """`model`'s state dict as .safetensors, converted by the command line to an .npz."""
    source, out = tmp_path / "timm.safetensors", tmp_path / "params.npz"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    argv = ["--model", name, "--checkpoint", str(source), "--out", str(out)]
    assert timm_weights.main(argv) == 0
    return str(out)


def _fine_tune(tmp_path, name: str, pretrained: str, image_size: int, caplog, **model):
    config = finetune.get_config(f"{name},cifar10")  # the family's recipe; digits below
    config.model.update(model)
    config.update(
        dataset="sklearn_digits",
        train_split="train",
        test_split="test",
        image_size=image_size,
        batch_size=64,
        total_steps=300,
        warmup_steps=30,
        base_lr=0.01,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        crop_min_area=1.0,
        eval_every=0,
        log_every=100,
        checkpoint_every=0,
        pretrained=pretrained,
    )
    with caplog.at_level(logging.INFO):
        _, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["count"] == DIGITS_TEST
    return metrics


def _predict_accuracy(tmp_path, name: str, image_size: int | None, expected_size: int) -> float:
    """`predict`'s accuracy on the digits' test split written as PNG files (lossless), the
    model fitted to the run's params.npz as `predict` fits it (window, grid, classes)."""
    images, labels = indexed_sources._digits_split("test")
    paths = [str(tmp_path / f"digit_{i}.png") for i in range(len(labels))]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    model, params, size = predict.load_for_prediction(tmp_path / "run", name, image_size=image_size)
    assert size == expected_size
    batch = np.stack([predict.load_image(p, size) for p in paths])
    logits = np.asarray(_compiled.apply(model, params, batch))
    return float(np.mean(logits.argmax(-1) == labels))


@pytest.mark.optimized  # hundreds of steps: running, not compiling, is its time
def test_swin_from_a_timm_checkpoint_fine_tunes_at_a_larger_window(tmp_path, caplog, capsys):
    torch.manual_seed(0)
    theirs = timm_swin.SwinTransformer(
        img_size=8, patch_size=2, embed_dim=32, depths=(2,), num_heads=(2,), window_size=2
    )
    npz = _converted(tmp_path, theirs, "testing-swin")
    metrics = _fine_tune(tmp_path, "testing-swin", npz, 12, caplog, window_size=3)
    assert "2 relative position tables resampled" in caplog.text
    assert "(9, 2) → (25, 2)" in caplog.text
    assert metrics["accuracy"] >= SWIN_FLOOR, metrics
    # The same pixels and model as the evaluation: at most one example flips on float rounding.
    # The window (3) comes from the file's tables; the file does not record its resolution.
    accuracy = _predict_accuracy(tmp_path, "testing-swin", 12, expected_size=12)
    assert abs(accuracy - metrics["accuracy"]) <= 1 / DIGITS_TEST
    # The command line on the workdir: the run's 12 px from its task.json, the window from the
    # tables, the class names it trained on.
    digits = [str(tmp_path / f"digit_{i}.png") for i in range(8)]
    capsys.readouterr()  # the converter's and the run's output so far
    assert predict.main(["--checkpoint", str(tmp_path / "run"), "--model", "testing-swin",
                         "--json", "--top_k=1", *digits]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    _, labels = indexed_sources._digits_split("test")
    hits = [r["top_k"][0]["label"] == str(y) for r, y in zip(printed, labels[:8], strict=True)]
    assert sum(hits) >= 5, printed  # 8 digits at 0.70 or more


@pytest.mark.optimized  # hundreds of steps: running, not compiling, is its time
def test_beit_from_a_timm_checkpoint_fine_tunes_on_a_larger_grid(tmp_path, caplog):
    torch.manual_seed(0)
    theirs = timm_beit.Beit(
        img_size=32,
        patch_size=16,
        embed_dim=64,
        depth=1,
        num_heads=4,
        mlp_ratio=2,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        init_values=0.1,
    )
    npz = _converted(tmp_path, theirs, "testing-beit")
    metrics = _fine_tune(tmp_path, "testing-beit", npz, 48, caplog)
    assert "1 relative position tables resampled" in caplog.text
    assert "(12, 4) → (28, 4)" in caplog.text
    assert metrics["accuracy"] >= BEIT_FLOOR, metrics
    # The grid (3 × 3) comes from the file's tables: 48 px without being told.
    accuracy = _predict_accuracy(tmp_path, "testing-beit", None, expected_size=48)
    assert abs(accuracy - metrics["accuracy"]) <= 1 / DIGITS_TEST
