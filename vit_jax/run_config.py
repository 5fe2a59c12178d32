"""From a run config to what it describes: validation, phases, the model, the optimizer.

Everything the loop builds from `config` is built here or in `vit_jax.run_data` (its data), so
the loop (`vit_jax.train`) reads no config key itself beyond the schedule of side work.
`validate_config` checks every key before any work (data download, compilation): a bad value
fails at once, naming the key and the fix. This module imports no TensorFlow, so `main` checks a
config (`check_before_start`) seconds before the data pipeline is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import (
    checkpoint,
    fewshot,
    model_heads,
    models,
    models_swin,
    models_vit,
    optim,
    resumable,
    tasks,
)
from vit_jax.csv_dataset import CSV_PREFIX, CsvSpec
from vit_jax.resumable import CHECKPOINT_DIR

OPTIM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPUTE_DTYPES = OPTIM_DTYPES
EVAL_CROPS = ("resize", "resize_small_crop")
# The model options (`model_options`' keys) each family takes besides `dtype` (compute_dtype)
# and `head_hidden_size`, which all take. The config keys that set them are in _OPTION_KEYS.
FAMILY_OPTIONS = {
    "vit": (
        "attention_impl",
        "remat_policy",
        "scan",
        "batch_chunks",
        "matmul_dtype",
        "drop_path_rate",
    ),
    "mixer": (),
    "swin": ("drop_path_rate",),
    "beit": ("drop_path_rate",),
}
_OPTION_KEYS = {"scan": "scan_layers"}
PHASE_PREFIX = "phase:"  # `pretrained = 'phase:<name>'` = the params.npz of an earlier phase


def validate_config(
    config: ml_collections.ConfigDict, device_count: int, local_device_count: int
) -> None:
    """Raises ValueError for a config the loop cannot run, saying what to change."""
    del local_device_count  # the per-process batch is checked by the input pipeline
    if config.batch_size <= 0 or config.batch_size % device_count:
        raise ValueError(
            f"batch_size={config.batch_size} must be a positive multiple of the device count "
            f"({device_count})."
        )
    per_device = config.batch_size // device_count
    if config.accum_steps <= 0 or per_device % config.accum_steps:
        raise ValueError(
            f"The per-device batch ({config.batch_size} / {device_count} devices = {per_device}) "
            f"must be divisible by accum_steps={config.accum_steps}."
        )
    tasks.check_config(config)
    _check_choice("optimizer", config.optimizer, optim.OPTIMIZERS)
    _check_choice("decay_type", config.decay_type, optim.DECAY_TYPES)
    _check_choice("optim_dtype", config.optim_dtype, tuple(OPTIM_DTYPES))
    _check_choice("eval_crop", config.eval_crop, EVAL_CROPS)
    models.check_model_config(config.model)
    _check_model_options(config)
    for key in ("total_steps", "log_every", "keep_checkpoints"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[key]}.")
    for key in ("eval_every", "checkpoint_every"):
        if config[key] < 0:
            raise ValueError(f"{key} must be ≥ 0 (0 = only at the end), got {config[key]}.")
    if not 0.0 < config.crop_min_area <= 1.0:
        raise ValueError(
            f"crop_min_area must be in (0, 1] (a share of the image; the original's 0.05, "
            f"MAE's 0.2), got {config.crop_min_area}."
        )
    if config.input_workers < 0:
        raise ValueError(
            f"input_workers must be ≥ 0 (0 = one per CPU core), got {config.input_workers}."
        )
    _check_patch_grid(config.model, config.image_size)
    fewshot.check_config(config)
    if config.fewshot.every and (config.fewshot.dataset or config.dataset).startswith(CSV_PREFIX):
        raise ValueError(
            "fewshot.every needs a class-labelled dataset; a 'csv:' one has real-valued "
            "targets. Set --config.fewshot.dataset to one, or fewshot.every=0."
        )
    make_optimizer(config, make_schedule(config))  # lr, warmup, steps, optimizer options
    if config.dataset.startswith(CSV_PREFIX):
        with csv_keys_named():
            csv_spec(config)  # folds, fractions, columns: before any file is read


def check_before_start(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Every check that reads no data, on this runtime's devices: `validate_config` and that
    `pretrained` exists (unless the run resumes); for a config with phases, each phase
    (`resolve_phases`). Then `make_workdir`. Errors as those raise them."""
    if "phases" in config:
        resolve_phases(config, workdir)
    else:
        validate_config(config, jax.device_count(), jax.local_device_count())
        check_pretrained_exists(config, workdir)
    make_workdir(workdir)


def make_workdir(workdir: str) -> None:
    """Creates `workdir` (and its parents); ValueError naming the path when it cannot be one."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"workdir {workdir!r} cannot be a directory: it, or a folder above it, is a file. "
            "Pass a directory path (it is created if missing)."
        ) from None
    except PermissionError as e:
        raise ValueError(
            f"workdir {workdir!r} cannot be created: permission denied for {e.filename!r}. "
            "Pass a directory you can write to."
        ) from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir!r} is not writable; pass a directory you can write to.")


def check_pretrained_exists(config: ml_collections.ConfigDict, workdir: str) -> None:
    """FileNotFoundError naming `config.pretrained` if it is missing and the run in `workdir`
    starts fresh (a resumed run reads its checkpoints instead)."""
    resuming = resumable.has_checkpoints(os.path.join(workdir, CHECKPOINT_DIR))
    if config.pretrained and not resuming:
        checkpoint.check_exists(checkpoint.resolve_params_file(config.pretrained))


def resolve_phases(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, ml_collections.ConfigDict]:
    """`{phase: config}` in run order, `'phase:<name>'` resolved to `<workdir>/<name>`.

    Each phase is validated here (ValueError naming the phase and its key, e.g.
    `config.finetune.base_lr`), so a bad later phase fails before an earlier one trains.
    """
    phases = {}
    for name in config.phases:
        phase = config[name]
        from_phase = phase.pretrained.startswith(PHASE_PREFIX)
        if from_phase:
            source = phase.pretrained[len(PHASE_PREFIX) :]
            if source not in phases:
                raise ValueError(
                    f"Phase {name!r} starts from phase {source!r}, which does not run before "
                    f"it; phases run in the order {tuple(config.phases)}."
                )
            phase = phase.copy_and_resolve_references()
            phase.pretrained = os.path.join(workdir, source)
        try:
            validate_config(phase, jax.device_count(), jax.local_device_count())
            if not from_phase:
                check_pretrained_exists(phase, os.path.join(workdir, name))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"Phase {name!r} (--config.{name}.<key>): {e}") from None
        phases[name] = phase
    return phases


def csv_spec(config: ml_collections.ConfigDict) -> CsvSpec:
    """The `config.csv` options of a 'csv:' dataset (its keys are `CsvSpec`'s fields)."""
    options = config.csv.to_dict()
    return CsvSpec(
        **{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in options.items()}
    )


@contextlib.contextmanager
def csv_keys_named() -> Iterator[None]:
    """A CSV error that names `CsvSpec.<key>` also says its config key, `--config.csv.<key>`."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if "CsvSpec." not in str(e):
            raise
        raise type(e)(f"{e} (CsvSpec.<key> is set by --config.csv.<key>.)") from None


def describe_run(config: ml_collections.ConfigDict, phase: str = "") -> str:
    """One line saying what is trained on what: model, dataset, image size, steps, devices."""
    model = config.model
    kind = models.family(model.model_name)
    if kind == "vit":
        t = model.transformer
        shape = f"width {model.hidden_size}, {t.num_layers} layers, {t.num_heads} heads"
    elif kind == "beit":
        shape = f"width {model.hidden_size}, {model.num_layers} layers, {model.num_heads} heads"
    elif kind == "swin":
        shape = (
            f"width {model.embed_dim}, stages of {'/'.join(map(str, model.depths))} blocks, "
            f"window {model.window_size}"
        )
    else:
        shape = f"width {model.hidden_dim}, {model.num_blocks} blocks"
    size = model.get("patch_size") or model.patches.size
    patch = "×".join(map(str, size if isinstance(size, (list, tuple)) else (size, size)))
    start = f", from {config.pretrained}" if config.pretrained else ", from scratch"
    devices = f"{jax.device_count()} device{'s' * (jax.device_count() > 1)}"
    if jax.process_count() > 1:
        devices += f" in {jax.process_count()} processes"
    task = config.get("task", "classification")
    return (
        f"{phase + ': ' if phase else ''}training {model.model_name} ({shape}, {patch} px "
        f"patches) for {task} on {config.dataset} [{config.train_split}] at "
        f"{config.image_size} px, {config.total_steps:,} steps of batch {config.batch_size} on "
        f"{devices}{start}; evaluating on [{config.test_split}]"
    )


def make_model(config: ml_collections.ConfigDict, num_classes: int, **head: Any):
    """The model of `config.model` with its head (`Task.head()`) and the config's options."""
    name = config.model.model_name
    return models.model_class(name)(
        **{**config.model.to_dict(), **model_options(config), **head, "num_classes": num_classes}
    )


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model options from `compute_dtype`, `attention_impl`, `remat_policy`, `scan_layers`,
    `batch_chunks`, `matmul_dtype`, `drop_path_rate` and `head_hidden_size`.

    Only options that differ from the model's defaults are returned, so a Mixer (which has
    `dtype` and `head_hidden_size` only) is built unchanged unless it asks for them.
    """
    options: dict[str, Any] = {}
    if config.compute_dtype != "float32":
        options["dtype"] = COMPUTE_DTYPES[config.compute_dtype]
    if config.attention_impl != "flax":
        options["attention_impl"] = config.attention_impl
    if config.remat_policy:
        options["remat_policy"] = config.remat_policy
    if config.scan_layers:
        options["scan"] = True
    if config.batch_chunks != 1:
        options["batch_chunks"] = config.batch_chunks
    if config.matmul_dtype:
        options["matmul_dtype"] = COMPUTE_DTYPES[config.matmul_dtype]
    if config.drop_path_rate:
        options["drop_path_rate"] = config.drop_path_rate
    if config.head_hidden_size:
        options["head_hidden_size"] = config.head_hidden_size
    return options


def make_schedule(config: ml_collections.ConfigDict) -> optim.Schedule:
    return optim.learning_rate_schedule(
        base_lr=config.base_lr,
        total_steps=config.total_steps,
        warmup_steps=config.warmup_steps,
        decay_type=config.decay_type,
        linear_end=config.linear_end,
    )


def make_optimizer(config: ml_collections.ConfigDict, schedule: optim.Schedule):
    return optim.make_optimizer(
        config.optimizer,
        schedule,
        grad_clip_norm=config.grad_clip_norm or None,
        momentum=config.momentum,
        accumulator_dtype=OPTIM_DTYPES[config.optim_dtype],
        b1=config.adam_b1,
        b2=config.adam_b2,
        weight_decay=config.weight_decay,
        layer_decay=config.layer_decay,
        num_layers=layer_count(config.model),
    )


def layer_count(model_config: ml_collections.ConfigDict) -> int:
    """The blocks layer-wise lr decay numbers (ViT and BEiT); 0 for the other families."""
    if models.family(model_config.model_name) == "beit":
        return int(model_config.num_layers)
    return int(model_config.get("transformer", {}).get("num_layers", 0))


# ----------------------------------------------------------------------------------------------
# Checks.


def _check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {key}={value!r}; valid values: {', '.join(valid)}.")


def _check_model_options(config: ml_collections.ConfigDict) -> None:
    _check_choice("compute_dtype", config.compute_dtype, tuple(COMPUTE_DTYPES))
    if config.matmul_dtype:
        _check_choice("matmul_dtype", config.matmul_dtype, tuple(COMPUTE_DTYPES))
    models_vit.validate_options(  # the model's own checks, before any setup work
        classifier=config.model.get("classifier", "token"),
        attention_impl=config.attention_impl,
        remat_policy=config.remat_policy or None,
        batch_chunks=config.batch_chunks,
        drop_path_rate=config.drop_path_rate,
        activation=config.model.get("activation", "gelu_tanh"),
        input_norm=config.model.get("input_norm", "inception"),
    )
    model_heads.check_head_hidden_size(config.head_hidden_size)
    kind = models.family(config.model.model_name)
    common = ("dtype", "head_hidden_size")
    refused = [k for k in model_options(config) if k not in (*common, *FAMILY_OPTIONS[kind])]
    if config.layer_decay != 1.0 and not layer_count(config.model):
        refused.append("layer_decay")
    if refused:
        takes = ["compute_dtype", "head_hidden_size"]
        takes += [_OPTION_KEYS.get(k, k) for k in FAMILY_OPTIONS[kind]]
        takes += ["layer_decay"] if kind in ("vit", "beit") else []
        raise ValueError(
            f"{config.model.model_name} (a {kind} model) takes {', '.join(takes)} only; unset "
            f"{', '.join(_OPTION_KEYS.get(k, k) for k in refused)}."
        )
    transformer = config.model.get("transformer")
    attention_dropout = (
        models_vit.transformer_option(transformer, "attention_dropout_rate") if transformer else 0
    )
    if config.attention_impl != "flax" and attention_dropout:
        raise ValueError(
            f"attention_impl={config.attention_impl!r} has no attention dropout, but the model's "
            f"transformer.attention_dropout_rate={attention_dropout}; set it to 0 or use "
            "attention_impl='flax'."
        )


def _check_patch_grid(model_config: ml_collections.ConfigDict, image_size: int) -> None:
    """Image size must tile into patches (after the hybrid stem's stride; Swin: into its
    windows at every stage); Mixer has no stem."""
    if models.family(model_config.model_name) == "swin":
        models_swin.check_image_size(
            image_size,
            tuple(model_config.depths),
            model_config.window_size,
            model_config.patch_size,
        )
        return
    resnet = model_config.get("resnet")
    models_vit.check_image_size(
        (image_size, image_size),
        tuple(model_config.patches.size),
        models_vit.stem_stride(resnet),
        model_config.model_name,
    )
