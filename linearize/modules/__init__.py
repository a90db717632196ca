"""Feature maps and the linear/hybrid attention module (architecture-agnostic)."""

from linearize.modules.attention import (
    HybridLinearAttention,
    LinearAttentionConfig,
    RecurrentCacheLayer,
    linear_attention_layers,
)
from linearize.modules.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map, register_feature_map

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "HybridLinearAttention",
    "LinearAttentionConfig",
    "RecurrentCacheLayer",
    "linear_attention_layers",
    "make_feature_map",
    "register_feature_map",
]
