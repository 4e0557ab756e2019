import re

from setuptools import setup


def _version() -> str:
    """``__version__`` from blockquant/__init__.py, read as text: importing the package here would import torch."""
    with open("blockquant/__init__.py", encoding="utf-8") as f:
        found = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M)
    if found is None:
        raise RuntimeError("blockquant/__init__.py: no line `__version__ = \"X.Y.Z\"`")
    return found.group(1)


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
    install_requires=[
        # the release the tests run on (constraints-cpu.txt); the code uses ops older releases lack,
        # e.g. aten._batch_norm_with_update, and no older release has been tested
        "torch>=2.13",
        "torch-geometric>=2.4",
        "ogb>=1.3.6",
        "triton>=2.1; platform_system == 'Linux'",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.4"],
    },
    entry_points={"console_scripts": ["blockquant=blockquant.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
