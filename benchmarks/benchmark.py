"""Speed and memory of ViT configurations side by side: `python benchmarks/benchmark.py`.

Each row is one (model, resolution, variant). The `reference` variant is numerically the
original (fp32, Flax attention, unrolled encoder, no remat); the others switch on the model's
speed/memory options, which keep the parameter tree. All variants run in one process, one after
another, so their ratios are comparable on a noisy machine; every time is the median of
`--repeats` timed runs after warm-up, the variants of a model timed in turns.

Columns:
  train img/s    the real pmap'd training step (`steps.train_step`: loss, grads, pmean, SGD with
                 momentum and clipping) over all local devices, global batch `--batch`;
  train × q1–q3  the quartiles of the round-by-round speed-up over the reference (see below);
  infer img/s    jit'd `model.apply(train=False)` on one device, batch `--batch`;
  compile s      lowering + XLA compilation of the train step;
  peak MiB       the compiled train step's device memory: arguments + outputs + temporaries −
                 aliased (donated) buffers, from XLA's `memory_analysis()`, per device;
  GFLOP/img      model FLOPs of a training step per image: XLA's `cost_analysis()` of the
                 reference variant's train step ÷ per-device batch, shown for every variant of
                 the model (XLA counts a scanned loop body once, and remat's recomputation is
                 not model work);
  MFU            on an accelerator with a known peak: GFLOP/img × train img/s ÷ (peak × devices),
                 against the dense bf16 peak.
Ratios (×) compare with the reference row of the same model and resolution. For the timed
columns the ratio is the median over rounds of (reference time ÷ this row's time) within the same
round: taken back to back, the two times share the machine's mood, so on a noisy VM the paired
ratio and its quartiles hold far better than a ratio of two medians.

With `timm` and `torch` importable, `--timm` adds timm's equivalent model, built from the zoo
entry's sizes (the ViT with tanh-GELU; Swin and BEiT as timm's `SwinTransformer` and `Beit`),
trained with torch SGD in fp32 on the CPU, as a `timm` row. Swin and BEiT take the `bf16`
variant only (compute dtype); the other variants' options are ViT's and are left out for them.

`--compile_only` rows (e.g. `ViT-L_16@224`) measure compile time and memory without running.
`--data` measures the input pipeline's training-batch rate at the benchmark's batch and
resolution on a folder of JPEG photographs written to a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs import common  # noqa: E402
from vit_jax import input_pipeline, models, optim, steps, tasks  # noqa: E402

# Model options per variant; every variant keeps the parameter tree and fp32 parameters.
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {},
    "xla_attn": {"attention_impl": "xla"},
    "scan": {"scan": True},
    "remat": {"remat_policy": "dots_with_no_batch_dims_saveable"},
    "bf16": {"dtype": jnp.bfloat16},
    "bf16_attn": {"dtype": jnp.bfloat16, "attention_impl": "auto"},
    "bf16_remat": {"dtype": jnp.bfloat16, "remat_policy": "nothing_saveable"},
    "bf16_scan_remat": {"dtype": jnp.bfloat16, "scan": True, "remat_policy": "nothing_saveable"},
    "chunks2": {"batch_chunks": 2},
    "chunks4": {"batch_chunks": 4},
    "bf16_dots": {"matmul_dtype": jnp.bfloat16},
    "bf16_dots_chunks4": {"matmul_dtype": jnp.bfloat16, "batch_chunks": 4},
    "bf16_cudnn": {"dtype": jnp.bfloat16, "attention_impl": "cudnn"},
}
GPU_ONLY_VARIANTS = ("bf16_cudnn",)  # cuDNN's fused attention exists on NVIDIA GPUs only
# Dense bf16 peak FLOP/s per device, by substrings of `device_kind` (vendor data sheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}
NUM_CLASSES = 1000


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    train_ips: float | None = None
    infer_ips: float | None = None
    compile_s: float | None = None
    peak_mib: float | None = None
    gflop_per_img: float | None = None
    mfu: float | None = None
    # Speed-ups over the reference row from rounds timed in turns: (median, q1, q3).
    train_vs_ref: tuple[float, ...] | None = None
    infer_vs_ref: tuple[float, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Measurements.


def build_model(name: str, variant: str):
    return models.get_model(name, num_classes=NUM_CLASSES, **VARIANTS[variant])


def train_step_fn(model):
    """The project's pmap'd training step with the fine-tuning optimizer (SGD + momentum)."""
    schedule = optim.learning_rate_schedule(
        base_lr=0.03, total_steps=10_000, warmup_steps=500, decay_type="cosine", linear_end=0.0
    )
    tx = optim.make_optimizer("sgd", schedule, grad_clip_norm=1.0, momentum=0.9)
    task = tasks.make_task(common.get_config(), _ClassesOnly(NUM_CLASSES))
    step = functools.partial(steps.train_step, task=task, schedule=schedule, accum_steps=1)
    return jax.pmap(step, axis_name="batch", donate_argnums=(0,)), tx


@dataclasses.dataclass(frozen=True)
class _ClassesOnly:
    """The dataset info a classification task needs: the class count."""

    num_classes: int
    class_names: tuple[str, ...] | None = None


@dataclasses.dataclass
class Prepared:
    """A row with its compile-time figures, and the calls that time it (each blocks)."""

    row: Row
    run_train: Callable[[], None]
    run_infer: Callable[[], None]


def prepare(name: str, resolution: int, variant: str, batch: int) -> Prepared:
    """Compiles the train step of one variant (compile time, memory, FLOPs) and its calls."""
    row = Row(f"{name}@{resolution}", variant)
    model = build_model(name, variant)
    devices = jax.local_device_count()
    per_device = batch // devices
    images = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    params = jax.jit(lambda r: model.init(r, images, train=False)["params"])(jax.random.PRNGKey(0))
    p_step, tx = train_step_fn(model)
    # Laid out as the step's outputs are, so the compiled step is fed its own layout each round.
    state = steps.replicate(
        train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    )
    rng = steps.replicate(jax.random.PRNGKey(1))
    x = np.random.default_rng(0).uniform(-1, 1, (devices, per_device, resolution, resolution, 3))
    labels = np.eye(NUM_CLASSES, dtype=np.float32)[np.arange(batch) % NUM_CLASSES]
    train_batch = {
        "image": jnp.asarray(x, jnp.float32),
        "label": jnp.asarray(labels.reshape(devices, per_device, NUM_CLASSES)),
    }

    start = time.perf_counter()
    compiled = p_step.lower(state, train_batch, rng).compile()
    row.compile_s = time.perf_counter() - start
    row.peak_mib = _peak_bytes(compiled) / 2**20
    flops = _flops(compiled)
    if flops:
        row.gflop_per_img = flops / per_device / 1e9

    holder = {"state": state}

    def run_train():
        holder["state"], metrics = compiled(holder["state"], train_batch, rng)
        jax.block_until_ready(metrics)

    infer = jax.jit(lambda p, im: model.apply({"params": p}, im, train=False))
    flat = jnp.asarray(x.reshape(-1, resolution, resolution, 3), jnp.float32)

    def run_infer():
        jax.block_until_ready(infer(params, flat))

    return Prepared(row, run_train, run_infer)


def round_robin_seconds(
    calls: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2
) -> list[list[float]]:
    """Wall times of every call over `repeats` rounds, timed in turns (a, b, c, a, b, c, ...).

    Taking turns spreads a noisy machine's slow spells over every variant, and round r of
    each call can be compared with round r of the others (`paired_ratios`).
    """
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    return times


def paired_ratios(reference: Sequence[float], times: Sequence[float]) -> tuple[float, ...]:
    """Speed-up over the reference, round by round: (median, lower quartile, upper quartile).

    A ratio of two times taken one after the other cancels most of a slow spell, so these
    quartiles say how sure a ratio is on a noisy machine.
    """
    ratios = [r / t for r, t in zip(reference, times, strict=True)]
    if len(ratios) < 2:
        return (ratios[0],) * 3
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, q1, q3


def model_variants(name: str, variants: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the variants whose options model `name` has, the others): Swin and BEiT have `dtype`."""
    fields = {f.name for f in dataclasses.fields(models.model_class(name))}
    ok = [v for v in variants if set(VARIANTS[v]) <= fields]
    return ok, [v for v in variants if v not in ok]


def measure_model(
    name: str, resolution: int, variants: Sequence[str], batch: int, repeats: int, with_timm: bool
) -> list[Row]:
    """Rows of every variant the model has (and timm's, if asked and available), in turns."""
    variants, left_out = model_variants(name, variants)
    if left_out:
        print(f"  {name}: no {', '.join(left_out)} (ViT options)", file=sys.stderr)
    prepared = [prepare(name, resolution, v, batch) for v in variants]
    if with_timm:
        timm_prepared = prepare_timm(name, resolution, batch)
        if timm_prepared is not None:
            prepared.append(timm_prepared)
    train_s = round_robin_seconds([p.run_train for p in prepared], repeats)
    infer_s = round_robin_seconds([p.run_infer for p in prepared], repeats)
    ref = next((i for i, p in enumerate(prepared) if p.row.variant == "reference"), None)
    for p, t, i in zip(prepared, train_s, infer_s, strict=True):
        p.row.train_ips = batch / statistics.median(t)
        p.row.infer_ips = batch / statistics.median(i)
        if ref is not None:
            p.row.train_vs_ref = paired_ratios(train_s[ref], t)
            p.row.infer_vs_ref = paired_ratios(infer_s[ref], i)
    return [p.row for p in prepared]


def measure(
    name: str, resolution: int, variant: str, batch: int, repeats: int, compile_only: bool
) -> Row:
    """One variant's row (compile figures only with `compile_only`)."""
    if not compile_only:
        return measure_model(name, resolution, [variant], batch, repeats, with_timm=False)[0]
    return prepare(name, resolution, variant, batch).row


def prepare_timm(name: str, resolution: int, batch: int) -> Prepared | None:
    """timm's model of the same size, fp32, torch SGD + momentum; None when timm is unavailable."""
    try:
        torch, timm = _import_timm()
    except ImportError:
        return None
    config = models.MODEL_CONFIGS[name]
    family = models.family(name)
    if family == "swin":
        model = timm.models.swin_transformer.SwinTransformer(
            img_size=resolution,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depths=config.depths,
            num_heads=config.num_heads,
            window_size=config.window_size,
            num_classes=NUM_CLASSES,
        )
    elif family == "beit":
        model = timm.models.beit.Beit(
            img_size=resolution,
            patch_size=config.patches.size[0],
            embed_dim=config.hidden_size,
            depth=config.num_layers,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_dim / config.hidden_size,
            use_abs_pos_emb=False,
            use_rel_pos_bias=True,
            init_values=config.layer_scale_init,
            num_classes=NUM_CLASSES,
        )
    elif config.get("resnet") is not None or "Mixer" in name:
        return None
    else:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=resolution,
            patch_size=config.patches.size[0],
            embed_dim=config.hidden_size,
            depth=config.transformer.num_layers,
            num_heads=config.transformer.num_heads,
            mlp_ratio=config.transformer.mlp_dim / config.hidden_size,
            num_classes=NUM_CLASSES,
            act_layer="gelu_tanh",
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    y = torch.arange(batch) % NUM_CLASSES

    def run_train():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def run_infer():
        model.eval()
        with torch.inference_mode():
            model(x)
        model.train()

    model.train()
    return Prepared(Row(f"{name}@{resolution}", "timm (torch fp32)"), run_train, run_infer)


def attention_agreement(
    name: str, resolution: int, batch: int, impl: str, dtype: Any = jnp.bfloat16
) -> tuple[float, float]:
    """Features of `impl` attention against XLA's: (largest |difference|, largest |XLA value|).

    Same parameters and images for both; the model's features (no head: a fresh head is all
    zeros and would hide any difference).
    """

    def features(attention_impl: str):
        return models.get_model(name, num_classes=0, dtype=dtype, attention_impl=attention_impl)

    images = jax.random.uniform(jax.random.PRNGKey(0), (batch, resolution, resolution, 3))
    images = images * 2 - 1
    params = jax.jit(features("xla").init, static_argnames="train")(
        jax.random.PRNGKey(1), images[:1], train=False
    )
    outputs = [
        jax.jit(features(i).apply, static_argnames="train")(params, images, train=False)
        for i in (impl, "xla")
    ]
    got, want = (np.asarray(o, np.float32) for o in outputs)
    return float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))


def measure_data(resolution: int, batch: int, steps: int) -> float:
    """Training batches per second × batch of the input pipeline on a JPEG image folder."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for split, count in (("train", 256), ("test", 8)):
            for label in range(4):
                folder = Path(root, split, f"class_{label}")
                folder.mkdir(parents=True)
                for i in range(count // 4):
                    pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        iterator = input_pipeline.get_train_iterator(
            f"folder:{root}",
            "train",
            image_size=resolution,
            global_batch_size=batch,
            local_device_count=jax.local_device_count(),
            seed=0,
        )
        next(iterator)
        start = time.perf_counter()
        for _ in range(steps):
            next(iterator)
        seconds = time.perf_counter() - start
        del iterator  # stops its reader threads before the folder goes
        return steps * batch / seconds


# ----------------------------------------------------------------------------------------------
# Helpers.


def _peak_bytes(compiled) -> float:
    stats = compiled.memory_analysis()
    if isinstance(stats, Sequence):
        stats = stats[0]
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((peak for key, peak in PEAK_FLOPS.items() if key in kind), None)


def _import_timm():
    """timm and torch; loads the repo's torchvision shim for CPU-only torch installs."""
    import importlib.util

    shim_path = REPO / "tests" / "_torchvision_shim.py"
    if shim_path.exists():
        spec = importlib.util.spec_from_file_location("_torchvision_shim", shim_path)
        shim = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shim)
        try:
            shim.ensure_torchvision_importable()
        except RuntimeError as e:
            raise ImportError(str(e)) from e
    import timm
    import torch

    return torch, timm


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, ref: float | None, invert: bool = False) -> str:
    if value is None or not ref:
        return ""
    ratio = ref / value if invert else value / ref
    return f" ({ratio:.2f}×)"


def _speed(ips: float | None, ref_ips: float | None, vs_ref: tuple[float, ...] | None) -> str:
    """img/s with its speed-up: the paired median when measured in turns, else a plain ratio."""
    if vs_ref is None:
        return _fmt(ips, ".1f") + _ratio(ips, ref_ips)
    return f"{_fmt(ips, '.1f')} ({vs_ref[0]:.2f}×)"


def _spread(vs_ref: tuple[float, ...] | None) -> str:
    return "-" if vs_ref is None else f"{vs_ref[1]:.2f}–{vs_ref[2]:.2f}"


def use_model_flops(rows: list[Row]) -> None:
    """Gives every row its reference row's FLOPs per image, and the MFU that follows."""
    refs = {r.model: r for r in rows if r.variant == "reference"}
    peak = _peak_flops()
    for r in rows:
        ref = refs.get(r.model)
        if ref is None or ref.gflop_per_img is None:
            if "scan" in VARIANTS.get(r.variant, {}):
                r.gflop_per_img = None  # XLA's count of a scanned loop is not the model's
            continue
        r.gflop_per_img = ref.gflop_per_img
        if peak and r.train_ips:
            r.mfu = r.gflop_per_img * 1e9 * r.train_ips / (peak * jax.local_device_count())


def print_table(rows: list[Row]) -> None:
    header = (
        f"| {'model':<14} | {'variant':<18} | {'train img/s':>18} | {'train × q1–q3':>13} | "
        f"{'infer img/s':>18} | {'compile s':>16} | {'peak MiB':>16} | {'GFLOP/img':>9} | "
        f"{'MFU':>5} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    refs = {r.model: r for r in rows if r.variant == "reference"}
    for r in rows:
        ref = refs.get(r.model, Row(r.model, ""))
        print(
            f"| {r.model:<14} | {r.variant:<18} | "
            f"{_speed(r.train_ips, ref.train_ips, r.train_vs_ref):>18} | "
            f"{_spread(r.train_vs_ref):>13} | "
            f"{_speed(r.infer_ips, ref.infer_ips, r.infer_vs_ref):>18} | "
            f"{_fmt(r.compile_s, '.1f') + _ratio(r.compile_s, ref.compile_s):>16} | "
            f"{_fmt(r.peak_mib, '.0f') + _ratio(r.peak_mib, ref.peak_mib):>16} | "
            f"{_fmt(r.gflop_per_img, '.1f'):>9} | "
            f"{_fmt(None if r.mfu is None else 100 * r.mfu, '.0f'):>5} |"
        )


def runnable_variants(variants: Sequence[str], platform: str) -> tuple[list[str], list[str]]:
    """(the variants that run on `platform`, the GPU-only ones left out elsewhere)."""
    if platform == "gpu":
        return list(variants), []
    return (
        [v for v in variants if v not in GPU_ONLY_VARIANTS],
        [v for v in variants if v in GPU_ONLY_VARIANTS],
    )


def _parse_models(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, spec.split(",")):
        name, _, res = item.partition("@")
        out.append((name, int(res or 224)))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ViT-Ti_16@224,ViT-B_16@224,ViT-B_16@384")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile_only", default="ViT-L_16@224", help="models: compile only")
    parser.add_argument("--compile_variants", default="reference,scan,bf16_scan_remat")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: 8 per device)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--data", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--check_attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU: cuDNN attention's bf16 features against XLA attention's",
    )
    args = parser.parse_args(argv)
    batch = args.batch or 8 * jax.local_device_count()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    variants, skipped = runnable_variants(variants, device.platform)
    if skipped:
        print(f"  skipping {', '.join(skipped)}: needs an NVIDIA GPU", file=sys.stderr)
    print(
        f"# {time.strftime('%Y-%m-%d')} jax {jax.__version__}, {jax.local_device_count()}× "
        f"{device.device_kind} ({device.platform}), global batch {batch}, median of "
        f"{args.repeats}\n"
    )
    rows = []
    with_timm = args.timm and jax.devices()[0].platform == "cpu"
    for name, res in _parse_models(args.models):
        rows += measure_model(name, res, variants, batch, args.repeats, with_timm)
        print(f"  measured {name}@{res}", file=sys.stderr)
    compile_rows = []
    for name, res in _parse_models(args.compile_only):
        for variant in args.compile_variants.split(","):
            compile_rows.append(prepare(name, res, variant, batch).row)
            print(f"  compiled {name}@{res} {variant}", file=sys.stderr)
    for table in (rows, compile_rows):
        if table:
            use_model_flops(table)
            print_table(table)
            print()
    if args.check_attention and on_gpu:
        for name, res in _parse_models(args.models):
            diff, scale = attention_agreement(name, res, batch, "cudnn")
            print(
                f"attention cudnn vs xla, {name}@{res} bf16 features: largest |difference| "
                f"{diff:.3g} (largest |value| {scale:.3g})"
            )
    if args.data:
        for name, res in _parse_models(args.models):
            train_ips = max(
                (r.train_ips or 0 for r in rows if r.model == f"{name}@{res}"), default=0
            )
            data_ips = measure_data(res, batch, steps=10)
            print(
                f"\ninput pipeline @{res}px, batch {batch}: {data_ips:.1f} img/s "
                f"(fastest train step {train_ips:.1f} img/s)"
            )


if __name__ == "__main__":
    main()
