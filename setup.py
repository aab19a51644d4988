"""automix-fast: AutoMix training with fused Triton kernels and a DALI data path."""
from setuptools import setup

setup(
    name="automix-fast",
    version="0.1.0",
    description="AutoMix (learned mixup) training engine with fused Triton kernels and DALI loading",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "automix_fast",
        "automix_fast.ops",
        "automix_fast.models",
        "automix_fast.mixing",
        "automix_fast.data",
        "automix_fast.engine",
        "automix_fast.commands",
        "automix_fast.kernels",
    ],
    package_data={"automix_fast": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "pillow",
        "safetensors",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "dali-cuda120": ["nvidia-dali-cuda120"],
        "tensorboard": ["tensorboard"],  # --log-tensorboard
        "test": ["pytest", "pytest-benchmark", "tensorboard"],
    },
    entry_points={"console_scripts": ["automix-fast=automix_fast.cli:main"]},
)
