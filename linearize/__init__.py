"""linearize: turn pretrained Hugging Face transformers into linear-attention models.

Importing the package registers the linearized architectures with transformers' Auto classes.
"""

__version__ = "0.1.0"

from linearize import models  # noqa: E402,F401  (registers Auto classes)
from linearize.errors import LinearizeError  # noqa: E402
from linearize.modules.attention import LinearAttentionConfig  # noqa: E402

__all__ = ["LinearAttentionConfig", "LinearizeError", "__version__", "models"]
