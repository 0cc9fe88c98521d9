from setuptools import setup

setup(
    name="dplis",
    version="0.1.0",
    description="Fast differentially private deep learning with DPlis smoothing and "
    "fused Triton kernels",
    python_requires=">=3.10",
    packages=["dplis", "dplis.kernels", "dplis.experiments"],
    package_dir={"dplis": "dplis", "dplis.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",  # nn.RMSNorm / F.rms_norm (the ghost engine's RMSNorm rule)
        "numpy",
        "scipy",
        "prv-accountant>=0.2",
        "mnist1d>=0.0.2",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "matplotlib", "ruff", "transformers"],
        "bench": ["opacus==1.6.0", "pytest-benchmark", "triton>=3.0"],
        "plot": ["matplotlib"],
    },
)
