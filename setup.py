"""Installs the vit_jax package (the model zoo, checkpoint format, data and training code)."""

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
    "tensorflow-cpu>=2.21.0",
    "tensorboard>=2.21.0",  # clu's summary writer needs it and does not declare it.
    "etils[epath]>=1.15.0",
    "numpy>=2.4",
    "scipy>=1.17",
    "pillow>=13.0",
    "scikit-learn>=1.9",  # ships the embedded offline dataset (handwritten digits).
    "absl-py>=2.5",
]

setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformer and MLP-Mixer in JAX/Flax, compatible with the released checkpoints.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vit_jax", "vit_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=9.0", "ruff>=0.17"],
        # An independent reader of the released format, for the interop tests (CPU torch).
        "interop": ["torch==2.13.0", "torchvision==0.28.0", "timm==1.0.31"],
    },
    license="Apache-2.0",
)
