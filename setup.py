from setuptools import find_packages, setup

setup(
    name="fastdag",
    version="0.1.0",
    description="DAG (Diffusion Alignment with GFlowNets) post-training of diffusion models, performance-engineered",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdag", "fastdag.*"]),
    package_data={"fastdag": ["assets/*", "assets/**/*"]},
    # Ranges are the versions tested; torch is installed first from its own wheel (see README).
    install_requires=[
        "torch>=2.11,<2.16",
        "diffusers>=0.42,<0.43",
        "peft>=0.21,<0.22",
        "transformers>=5.20,<6",
        "deepspeed>=0.19,<0.20",
        "safetensors>=0.7,<0.9",
        "pillow>=11,<14",
        "numpy>=2.0,<2.6",
        "pyyaml>=6.0,<7",
        "tqdm>=4.66,<5",
        "matplotlib>=3.9,<3.12",
    ],
    extras_require={
        "kernels": ["triton>=3.6,<3.10"],
        "gpu": ["triton>=3.6,<3.10", "xformers>=0.0.35", "bitsandbytes>=0.50,<0.51", "nvidia-ml-py>=13"],
        # logging.tracker; tensorboard 2.21 tested (tests/test_tracking.py), wandb's offline mode not tested here
        "tracking": ["tensorboard>=2.21,<2.22", "wandb>=0.31,<0.32"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "triton>=3.6,<3.10", "tensorboard>=2.21,<2.22"],
    },
    entry_points={"console_scripts": ["fastdag=fastdag.cli:main"]},
)
