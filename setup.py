from setuptools import find_packages, setup

setup(
    name="megatron-recycle",
    version="0.2.0",
    description="Grow pretrained Megatron-Core MoE checkpoints (depth x experts) at load time "
    "into any TP/EP/PP layout, and resume pretraining.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["megatron_recycle", "megatron_recycle.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "numpy",
        "psutil",  # dist_checkpointing's writer process
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "demo": ["matplotlib"],
        # Hugging Face checkpoints (config.json + safetensors): safetensors reads and writes them;
        # transformers is not needed to grow, only to load the result
        "hf": ["safetensors>=0.4"],
        # `megatron-recycle eval`: a Hugging Face checkpoint grown in memory, run by lm-evaluation-harness
        "eval": ["safetensors>=0.4", "transformers", "lm-eval>=0.4.13,<0.5", "accelerate>=1.0"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["megatron-recycle=megatron_recycle.cli:run"]},
)
