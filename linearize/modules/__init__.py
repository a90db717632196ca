"""Feature maps and the linear/hybrid attention module (architecture-agnostic)."""

from linearize.modules.attention import HybridLinearAttention, LinearAttentionConfig
from linearize.modules.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map, register_feature_map

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "HybridLinearAttention",
    "LinearAttentionConfig",
    "make_feature_map",
    "register_feature_map",
]
