"""mmjax: multimodal (image-, audio- and video-text) pretraining in JAX/Flax."""
from setuptools import find_packages, setup

SPEECH = ["espeakng-loader>=0.2.4"]
PARITY = ["torch>=2.4", "transformers>=4.45"]

setup(
    name="mmjax",
    version="0.1.0",
    description="JAX/Flax pretraining and evaluation of image-, audio- and video-text "
                "models (CLIP, SigLIP, LiT, CoCa, BLIP-2, LLaVA, CLAP, video CLIP).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "ml_collections>=1.0.0",
        "einops>=0.8.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "opencv-python-headless>=4.8",
        "simplejpeg>=1.7",
        "safetensors>=0.4.3",
        "fsspec>=2024.3.0",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",      # named tokenizers: files through the hub cache
        "sentencepiece>=0.2.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "pycocoevalcap>=1.2",
        "soundfile>=0.12",            # audio decoding (libsndfile, bundled in the wheels)
        "soxr>=0.3.7",                # audio resampling
        "av>=12.0",                   # video decoding (PyAV, FFmpeg bundled in the wheels)
        "matplotlib>=3.8",            # training curves of the eval report (Agg backend)
    ],
    extras_require={
        # The test suite includes parity tests against Hugging Face transformers and
        # compiles the train step for TPU slices deviceless (libtpu through jax[tpu]).
        # librosa: the log-mel parity reference; pytest-xdist: two test processes
        # (the suite is compile-bound, and one XLA compile uses one core). selenium:
        # renders the eval report in headless Chromium (the system's chromium and
        # chromedriver; the test skips without them). espeakng-loader: the spoken-word
        # set (`mmjax.data.synthetic_speech`) is tested.
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "tensorflow-datasets>=4.9.6",
                 "jax[tpu]>=0.6.0", "librosa>=0.10", "selenium>=4.15", *PARITY, *SPEECH],
        "parity": PARITY,
        "speech": SPEECH,  # eSpeak NG for the spoken-word set (benchmarks/audio_speech.py)
        "tfds": ["tensorflow-datasets>=4.9.6"],
        "gpu": ["jax[cuda12]>=0.6.0"],
        "tpu": ["jax[tpu]>=0.6.0"],
        "remote": ["gcsfs>=2024.3.0", "s3fs>=2024.3.0", "aiohttp>=3.9"],
    },
    entry_points={"console_scripts": ["mmjax=mmjax.cli:main"]},
    include_package_data=True,
    package_data={"mmjax.data": ["assets/*.json"]},
)
