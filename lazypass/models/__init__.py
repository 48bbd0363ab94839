"""Reference models: the official DiT architecture and a tiny seeded DiT for tests."""

from lazypass.models.dit import DIT_CONFIGS, DiT, DiTBlock, build_dit, dit_config, tiny_dit

__all__ = ["DIT_CONFIGS", "DiT", "DiTBlock", "build_dit", "dit_config", "tiny_dit"]
