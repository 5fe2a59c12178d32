"""The Colab notebook runs headlessly, end to end, on a tiny model and local data.

`colab/vit_jax.ipynb` is executed unchanged except for its `parameters` cell (papermill's
convention), whose source is replaced with CI values: a tiny ViT (the zoo's `testing` with 4×4
patches, 1,000 classes) written with `checkpoint.save`, a photo and the ImageNet class names
from ../shared/data, the embedded `sklearn_digits` dataset at 16 px and a few steps. The kernel
runs with the repository root as cwd and on PYTHONPATH, on two fake CPU devices. The tests check
what the cells printed and drew, so a dependency change that breaks the notebook fails here.

Without ../shared/data (a fresh clone) the notebook still runs, on a generated image and a
generated labels file; the test that needs the real photo and names skips, saying why.
"""

from __future__ import annotations

import ast
import base64
import copy
import io
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from PIL import Image

from tests._commands import subprocess_env
from vit_jax import checkpoint, models, predict

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "colab" / "vit_jax.ipynb"
DATA = REPO / ".." / "shared" / "data"
PHOTO = DATA / "images" / "skimage_chelsea_cat.png"
IMAGENET_LABELS = DATA / "labels" / "ilsvrc2012_wordnet_lemmas.txt"
HAVE_SHARED_DATA = PHOTO.is_file() and IMAGENET_LABELS.is_file()

PARAMETER_NAMES = {
    "CHECKPOINT",
    "MODEL",
    "MODEL_OVERRIDES",
    "LABELS",
    "IMAGE",
    "DATASET",
    "IMAGE_SIZE",
    "STEPS",
    "BATCH",
    "WORKDIR",
}
TINY_MODEL = "testing"
TINY_OVERRIDES = {"patches": {"size": (4, 4)}}  # 16 px → a 4×4 grid of patches
IMAGE_SIZE = 16
NUM_CLASSES = 1000  # the ImageNet head, so the real labels file fits
DIGITS_TEST_EXAMPLES = 360  # sklearn_digits' test split
DEVICES = 2  # fake CPU devices in the kernel (pmap over 2, as over a TPU's 8); divides BATCH
CELL_TIMEOUT_S = 300
TOP_LINE = re.compile(r"^\s*(\d+\.\d{4})  (.+)$")


# ----------------------------------------------------------------------------------------------
# Helpers.


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def cell(nb: nbformat.NotebookNode, cell_id: str) -> nbformat.NotebookNode:
    [found] = [c for c in nb.cells if c.get("id") == cell_id]
    return found


def with_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """A copy of `nb` whose `parameters` cell assigns exactly `values` (as Python literals)."""
    nb = copy.deepcopy(nb)
    parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


def kernel_env() -> dict[str, str]:
    env = subprocess_env(DEVICES)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend: figures → image/png
    return env


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Runs every cell in a fresh python3 kernel at the repository root; raises on a cell error."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute(env=kernel_env())
    return nb


def text(code_cell: nbformat.NotebookNode, stream: str = "stdout") -> str:
    return "".join(
        o.text for o in code_cell.outputs if o.output_type == "stream" and o.name == stream
    )


def pngs(code_cell: nbformat.NotebookNode) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
        for o in code_cell.outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
    ]


def top5(executed: nbformat.NotebookNode) -> list[tuple[float, str]]:
    return [
        (float(m[1]), m[2])
        for line in text(cell(executed, "predict")).splitlines()
        if (m := TOP_LINE.match(line))
    ]


def write_tiny_checkpoint(path: Path) -> None:
    """The zoo's `testing` ViT with 4×4 patches and a 1,000-class head, initialised at 16 px.

    The head (zero-initialised by the model) gets random weights, so the classes' probabilities
    differ and the top-5 is not a tie.
    """
    model = models.get_model(TINY_MODEL, num_classes=NUM_CLASSES, **TINY_OVERRIDES)
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, train=False))()["params"]
    params = jax.device_get(params)
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.default_rng(0).normal(size=kernel.shape).astype(np.float32)
    checkpoint.save(params, path)


def inputs(tmp: Path) -> tuple[str, str]:
    """(image, labels): the shared photo and ImageNet names, or generated stand-ins."""
    if HAVE_SHARED_DATA:
        return str(PHOTO.resolve()), str(IMAGENET_LABELS.resolve())
    ramp = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    image = tmp / "generated.png"
    Image.fromarray(ramp).save(image)
    labels = tmp / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(NUM_CLASSES)), encoding="utf-8")
    return str(image), str(labels)


# ----------------------------------------------------------------------------------------------
# The committed notebook.


def test_notebook_is_valid_clean_and_defaults_to_colab():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for code_cell in (c for c in nb.cells if c.cell_type == "code"):
        assert code_cell.outputs == [] and code_cell.execution_count is None, code_cell.id
    tree = ast.parse(parameters_cell(nb).source)
    assert all(isinstance(node, ast.Assign) for node in tree.body)  # plain `NAME = literal` lines
    defaults = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}
    assert set(defaults) == PARAMETER_NAMES
    assert defaults["CHECKPOINT"] == "gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz"
    assert defaults["MODEL"] == "ViT-B_16" and defaults["MODEL_OVERRIDES"] == {}
    assert defaults["MODEL"] in models.MODEL_CONFIGS
    assert defaults["LABELS"] == predict.IMAGENET1K_LABELS_URL
    assert defaults["IMAGE"].startswith("https://")
    assert defaults["DATASET"] == "cifar10"
    assert defaults["BATCH"] % 8 == 0  # a TPU v2-8 has 8 devices


# ----------------------------------------------------------------------------------------------
# The notebook, executed with the CI parameters.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(executed notebook, CI parameters): one headless run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("notebook")
    write_tiny_checkpoint(tmp / "tiny.npz")
    image, labels = inputs(tmp)
    values = {
        "CHECKPOINT": str(tmp / "tiny.npz"),
        "MODEL": TINY_MODEL,
        "MODEL_OVERRIDES": TINY_OVERRIDES,
        "LABELS": labels,
        "IMAGE": image,
        "DATASET": "sklearn_digits",
        "IMAGE_SIZE": IMAGE_SIZE,
        "STEPS": 20,
        "BATCH": 32,
        "WORKDIR": str(tmp / "workdir"),
    }
    assert set(values) == PARAMETER_NAMES
    return execute(with_parameters(read_notebook(), values)), values


def test_every_cell_ran_without_error(run):
    executed, _ = run
    for code_cell in (c for c in executed.cells if c.cell_type == "code"):
        assert code_cell.execution_count is not None, code_cell.id
        errors = [o for o in code_cell.outputs if o.output_type == "error"]
        assert not errors, (code_cell.id, errors)
    assert "nothing to install" in text(cell(executed, "install"))
    assert f"{DEVICES} device(s)" in text(cell(executed, "setup"))


def test_prediction_prints_top5_classes_from_the_labels_file(run):
    executed, values = run
    names = Path(values["LABELS"]).read_text(encoding="utf-8").splitlines()
    header = text(cell(executed, "predict")).splitlines()[0]
    assert f"({NUM_CLASSES} classes, {IMAGE_SIZE} px)" in header and values["IMAGE"] in header
    rows = top5(executed)
    assert len(rows) == 5
    probs = [p for p, _ in rows]
    assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-3
    assert probs == sorted(probs, reverse=True)
    assert all(name in names for _, name in rows)
    assert len({name for _, name in rows}) == 5


@pytest.mark.skipif(not HAVE_SHARED_DATA, reason=f"{PHOTO} or {IMAGENET_LABELS} not found")
def test_prediction_used_the_shared_photo_and_imagenet_names(run):
    executed, values = run
    assert values["IMAGE"] == str(PHOTO.resolve())
    lemmas = IMAGENET_LABELS.read_text(encoding="utf-8").splitlines()
    assert len(lemmas) == NUM_CLASSES
    assert all(name in lemmas for _, name in top5(executed))


def test_finetuning_evaluated_every_test_example(run):
    executed, values = run
    output = text(cell(executed, "finetune"))
    assert f"{values['STEPS']} steps on sklearn_digits" in output
    match = re.search(r"final eval: accuracy=(\S+) top5=(\S+) loss=(\S+) count=(\d+)", output)
    assert match, output
    accuracy, top5_accuracy, loss = (float(match[i]) for i in (1, 2, 3))
    assert int(match[4]) == DIGITS_TEST_EXAMPLES
    assert 0.0 <= accuracy <= top5_accuracy <= 1.0 and np.isfinite(loss)
    run_dirs = list(Path(values["WORKDIR"]).iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "params.npz").is_file()


def test_curves_and_attention_map_are_drawn(run):
    executed, _ = run
    plotted = text(cell(executed, "curves"))
    for tag in ("train/loss", "eval/loss", "eval/accuracy"):  # read from the run's event files
        points = re.search(rf"^{tag}: (\d+) points", plotted, re.MULTILINE)
        assert points and int(points[1]) >= 2, plotted  # curves, not single points
    for cell_id in ("curves", "attention"):
        images = pngs(cell(executed, cell_id))
        assert len(images) == 1, cell_id
        width, height = images[0].size
        assert width > 300 and height > 200, (cell_id, images[0].size)
        assert np.asarray(images[0].convert("L")).std() > 0  # not a blank canvas


# ----------------------------------------------------------------------------------------------
# The check can fail.


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = read_notebook()
    position = nb.cells.index(parameters_cell(nb)) + 1
    failing = nbformat.v4.new_code_cell("raise RuntimeError('x')")
    failing.id = "fails"
    nb.cells.insert(position, failing)
    with pytest.raises(CellExecutionError, match="RuntimeError"):
        execute(nb)
    assert any(o.output_type == "error" and o.ename == "RuntimeError" for o in failing.outputs)
    later = [c for c in nb.cells[position + 1 :] if c.cell_type == "code"]
    assert later and all(c.execution_count is None for c in later)  # the run stopped there


# ----------------------------------------------------------------------------------------------
# The notebook's reader of the trainer's TensorBoard event files (clu's writer).


def test_event_file_reader_returns_the_scalars_only(tmp_path):
    from clu import metric_writers

    namespace: dict = {}
    exec(compile(cell(read_notebook(), "setup").source, "setup-cell", "exec"), namespace)
    writer = metric_writers.create_default_writer(str(tmp_path / "train"))
    writer.write_hparams({"model": "testing", "base_lr": 0.1})
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step, "accuracy": 0.25 * step})
    writer.write_images(3, {"sample": np.zeros((1, 4, 4, 3), np.float32)})
    writer.close()
    scalars = namespace["read_event_scalars"](str(tmp_path))
    assert set(scalars) == {"train/loss", "train/accuracy"}
    assert scalars["train/loss"][0] == [1, 2, 3]
    np.testing.assert_allclose(scalars["train/accuracy"][1], [0.25, 0.5, 0.75])
    assert namespace["read_event_scalars"](str(tmp_path / "missing")) == {}
