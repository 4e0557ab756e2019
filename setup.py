import re

from setuptools import setup


def _version() -> str:
    """``__version__`` from blockquant/__init__.py, read as text: importing the package here would import torch."""
    with open("blockquant/__init__.py", encoding="utf-8") as f:
        found = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if found is None:
        raise RuntimeError("blockquant/__init__.py: no line `__version__ = \"X.Y.Z\"`")
    return found.group(1)


# Optional parts; a missing one fails with a one-line message naming its extra (blockquant/_optional.py).
BENCH = ["matplotlib>=3.5", "ogb>=1.3.6"]  # plots of bench/tune --out; the ogbn-* datasets (ogb brings pandas)
GPU = ["triton>=2.1; platform_system == 'Linux'"]  # the fused GPU kernels (PyPI's Linux CUDA torch brings its own)
EXTRAS = {
    "bench": BENCH,
    "gpu": GPU,
    # the tests run the benchmark and, on CPU, the Triton kernels through Triton's interpreter
    "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.4"] + BENCH + GPU,
    "docs": ["sphinx>=7", "myst-parser>=2", "furo"],  # the documentation site: docs/, built by .ci/run
}

setup(
    name="blockquant",
    version=_version(),
    description="Block-wise low-bit activation compression for memory-efficient GNN training (PyTorch / PyG)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["blockquant", "blockquant.functional", "blockquant.nn", "blockquant.bench", "blockquant.kernels"],
    # kernels/ lives at the top of the repository but installs as blockquant.kernels:
    # a PyPI package called ``kernels`` already exists and would collide.
    package_dir={"blockquant": "blockquant", "blockquant.kernels": "kernels"},
    # the CPU codec's C source, compiled with the system's C compiler at first use
    package_data={"blockquant.kernels": ["*.c"]},
    # convert, the codec, the functional ops and tune: torch and PyG (which also bring numpy and tqdm)
    install_requires=[
        # the oldest release the test suite passes on (tools/torch_floor.sh, bench/results/torch_floor.md)
        "torch>=2.12.1",
        "torch-geometric>=2.4",
        "tqdm>=4.60",  # tune's progress bar; a torch-geometric dependency anyway
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["blockquant=blockquant.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
