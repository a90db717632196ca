"""Feature maps and the linear/hybrid attention module (architecture-agnostic).

- ``config.py``: :class:`LinearAttentionConfig`, the settings saved with an export (no torch needed);
- ``feature_maps.py``: the registry of phi maps;
- ``attention.py``: :class:`HybridLinearAttention`, the :class:`RecurrentCacheLayer` protocol it needs from a cache.
"""
