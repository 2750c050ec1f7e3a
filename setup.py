"""gigamim: SimMIM pretraining of SwinV2 (up to 3B) on DeepSpeed ZeRO-3.

`pip install -e ".[test]"` installs everything the library, the demo and the tests need.
NVIDIA apex is used only when it is already importable (built from source on a GPU
cluster); PyPI's `apex` is an unrelated package and is deliberately not listed.
"""

from setuptools import find_packages, setup

setup(
    name="gigamim",
    version="0.1.0",
    description="SimMIM pretraining of SwinV2 encoders up to 3B parameters on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The benchmark harnesses live in benchmarks/ (next to their results) and install as
    # `gigamim_benchmarks`, so `gigamim bench` works from any directory. The DeepSpeed templates
    # live in the top-level ds_configs/ and install where they always were,
    # gigamim/configs/deepspeed/ (gigamim.config.resolve_ds_config_path looks in both).
    packages=find_packages(include=["gigamim", "gigamim.*"]) + ["gigamim_benchmarks", "gigamim.configs.deepspeed"],
    package_dir={"gigamim_benchmarks": "benchmarks", "gigamim.configs.deepspeed": "ds_configs"},
    package_data={"gigamim": ["configs/*.yaml"], "gigamim.configs.deepspeed": ["*.json"]},
    include_package_data=True,
    install_requires=[
        # Tested: torch 2.11.0 (triton 3.6, Python 3.12: the GPU image's stack) and 2.14.1 (triton
        # 3.8, Python 3.11), see benchmarks/results/torch211_2026-12-04. torchvision comes with timm.
        "torch>=2.11",
        "timm>=1.0.31",  # ModelEmaV3(dtype=): an fp32 EMA of a bf16 model (finetune.ema)
        "deepspeed>=0.19,<0.20",
        "webdataset>=1.0.2,<1.1",
        "braceexpand",  # data/shardspec.py expands {000..099} itself (webdataset's own dependency too)
        "pyyaml>=6",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "numpy",
        "pillow>=10",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    # scikit-learn: the probe tests compare with its logistic regression; the real-image check uses its digits.
    # scikit-image: the README's own-images test builds its photo folder from its sample photos.
    extras_require={"test": ["pytest>=8", "pytest-timeout", "scikit-learn", "scikit-image"]},
    entry_points={"console_scripts": ["gigamim = gigamim.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
