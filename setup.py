"""Install the `dinov2` package (dinov2-cells): `pip install -e .` or `pip install -e '.[dev]'`."""

from setuptools import find_packages, setup

# Keep these pins identical to requirements-dev.txt and conda.yaml (tests/test_packaging.py checks).
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "omegaconf==2.4.0",
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.10",
    "submitit==1.5.4",
    "scikit-learn==1.9.1",
    "umap-learn==0.5.12",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
    "python-multipart==0.0.34",
]
EXTRAS_REQUIRE = {
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        "ruff==0.17.6",
        "pre-commit==4.7.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "tensorboard==2.21.0",
        "timm==1.0.31",
        "httpx==0.28.1",
        "selenium==4.51.0",
    ],
    "xformers": ["xformers"],
}

setup(
    name="dinov2-cells",
    version="0.1.0",
    description="Self-supervised DINOv2 pretraining and evaluation for white-blood-cell microscopy",
    packages=find_packages(include=["dinov2", "dinov2.*"]),
    package_data={"dinov2": ["configs/*.yaml", "configs/train/*.yaml", "serve/static/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "dinov2-synth=dinov2.data.synthetic:main",
            "dinov2-scan=dinov2.data.scan:main",
            "dinov2-train=dinov2.train.train:main",
            "dinov2-submit-train=dinov2.run.train.train:main",
            "dinov2-eval=dinov2.eval.cli:main",
            "dinov2-split=dinov2.data.split:main",
            "dinov2-finetune=dinov2.transfer.finetune:main",
            "dinov2-infer=dinov2.transfer.infer:main",
            "dinov2-demo=dinov2.run.demo:main",
            "dinov2-serve=dinov2.run.serve:main",
        ]
    },
)
