"""mmjax: multimodal (image-, audio- and video-text) pretraining in JAX/Flax."""
__version__ = "0.1.0"
