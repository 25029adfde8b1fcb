"""rnope-megatron: RNoPE-SWA hybrid attention (3 sliding-window RoPE layers, 1 global NoPE
layer) as a Megatron-Core plugin."""

from setuptools import find_packages, setup

QUANT = ["nvidia-modelopt>=0.47", "requests"]
WANDB = ["wandb>=0.19"]
RECIPES = "rnope_megatron.recipes"

setup(
    name="rnope-megatron",
    version="0.1.0",
    description="RNoPE-SWA hybrid attention for Megatron-Core (TE and portable backends)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The top-level recipes/ folder travels with the package as rnope_megatron.recipes
    # (rnope-train 8b/128k resolves names there: rnope_megatron/recipe/catalog.py).
    packages=[*find_packages(include=["rnope_megatron", "rnope_megatron.*"]), RECIPES],
    package_dir={RECIPES: "recipes"},
    package_data={
        # The CPU sliding-window kernel is compiled from source on first use (native_cpu.py).
        "rnope_megatron.attention": ["csrc/*.cpp", "csrc/*.h"],
        # every recipe and section file, nested folders included (8b/128k.yaml, models/, data/)
        RECIPES: ["*.yaml", "**/*.yaml"],
    },
    python_requires=">=3.12",
    install_requires=[
        "megatron-core>=0.19,<0.20",
        "torch>=2.6",
        "pyyaml>=6",
        "numpy",
        # megatron-core's checkpoint writer imports it at the first save (not a dependency
        # of megatron-core itself).
        "psutil",
    ],
    extras_require={
        # GPU clusters: Megatron's TE wrappers (fused attention, sliding windows, FP8).
        # 2.3: the first TE whose fused RoPE takes interleaved pairs (Cohere2's layout).
        "te": ["transformer-engine[pytorch]>=2.3"],
        # Hugging Face conversion (rnope-convert) and its parity tests.
        "hf": ["transformers>=5.0", "safetensors"],
        # Quantization (rnope-quantize, QAT) with NVIDIA Model Optimizer. modelopt 0.47
        # imports requests without declaring it. Also in dev: CI runs the quantization tests.
        "quant": QUANT,
        "modelopt": QUANT,  # the earlier name of the same extra
        # Weights & Biases logging beside TensorBoard (logging.wandb in a recipe).
        "wandb": WANDB,
        # lm-evaluation-harness (its hf model needs accelerate): the test that scores an
        # export through the harness on rnope-eval's own cases (rnope-eval lm-eval-tasks).
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "matplotlib", "tensorboard", *QUANT, "lm-eval>=0.4.9", "accelerate", *WANDB,
                # the layer contract of .importlinter, checked by make test
                "import-linter>=2.0"],
    },
    entry_points={
        "console_scripts": [
            "rnope-train = rnope_megatron.train.__main__:main",
            "rnope-preprocess = rnope_megatron.data.preprocess:main",
            "rnope-convert = rnope_megatron.convert.__main__:main",
            "rnope-eval = rnope_megatron.eval.cli:main",
            "rnope-plan = rnope_megatron.plan.__main__:main",
            "rnope-quantize = rnope_megatron.quantize.__main__:main",
        ]
    },
    classifiers=["Programming Language :: Python :: 3.12"],
)
