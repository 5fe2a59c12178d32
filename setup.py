"""Installs the vit_jax package (the model zoo, checkpoint format, data and training code)."""

import pathlib

from setuptools import find_packages, setup

# Lower bounds are the versions this project was developed and tested with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "clu>=0.0.12",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    # tfds imports it (downloading, `tfds build`) on Python 3.11 without declaring it.
    "importlib_resources>=6.4",
    "tensorflow-cpu>=2.21.0",
    "tensorboard>=2.21.0",  # clu's summary writer needs it and does not declare it.
    "etils[epath]>=1.15.0",
    "numpy>=2.4",
    "scipy>=1.17",
    "pillow>=13.0",
    "scikit-learn>=1.9",  # ships the embedded offline dataset (handwritten digits).
    "absl-py>=2.5",
    # `vit_jax.timm_weights` reads timm's .safetensors weights with it, without torch (small,
    # no dependencies of its own); .pth files need the interop extra's torch.
    "safetensors>=0.8",
    # Prepared records (`vit_jax.prepare_data`, 'records:' datasets): ArrayRecord shards read
    # with grain's shuffle.
    "array-record>=0.8.6",
    "grain>=0.2.18",
]

# What colab/*.ipynb needs beyond the package: a kernel and plots.
NOTEBOOK = ["ipykernel>=7.4.0", "matplotlib>=3.11.2"]

setup(
    name="vit_jax",
    version="0.1.0",
    description=(
        "Vision Transformer and MLP-Mixer in JAX/Flax, compatible with the released checkpoints."
    ),
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # `configs` (the run configs; `configs.default` is the command line's default) ships too.
    packages=find_packages(include=["vit_jax", "vit_jax.*", "configs", "configs.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # The notebook test runs colab/*.ipynb headlessly, so it needs the notebook extra too.
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.6",
            "ruff>=0.17",
            *NOTEBOOK,
            "nbclient>=0.11.0",
            "nbformat>=5.11.1",
        ],
        "notebook": NOTEBOOK,
        # An independent reader of the released format, for the interop tests (CPU torch).
        "interop": ["torch==2.13.0", "torchvision==0.28.0", "timm==1.0.31"],
    },
    license="Apache-2.0",
)
