"""Configs: the base config every recipe starts from, loading a recipe with
`--config.KEY=VALUE` overrides, and the checks a config passes before anything
is built (`mmjax.config.schema`)."""
from mmjax.config.defaults import base_config, make_tiny
from mmjax.config.loading import apply_override, load_config

__all__ = ["base_config", "make_tiny", "load_config", "apply_override"]
