"""smallvit: a fast data-and-training engine for Vision Transformers on small image datasets."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "engine" / "__init__.py").read_text())[1]

setup(
    name="smallvit",
    version=VERSION,
    description="Train Vision Transformers on small image datasets fast: FFCV/DALI/GPU-resident loaders, "
    "GPU augmentation, drloc and translation-perceptibility auxiliary tasks, Triton kernels, DeepSpeed loop.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "loaders", "loaders.*",
                                    "bench", "bench.*"]),
    package_data={"engine": ["configs/*.yaml"]},
    install_requires=[
        # torch is pinned by the requirements file of each machine kind; never let pip choose it here.
        "torch>=2.4", "timm>=1.0", "numpy", "PyYAML", "tqdm", "matplotlib", "scikit-learn", "scipy",
        "safetensors", "tensorboard", "pillow", "deepspeed>=0.15",
    ],
    extras_require={
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python-headless"],
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["smallvit=engine.cli:main"]},
)
