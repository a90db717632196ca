"""Import ``linearize`` for the kernel benchmarks even where its package ``__init__`` cannot load (it pulls in
transformers and the rest; the kernels need only torch and triton): ``import kernels_only`` from a script in this
folder, before importing ``linearize.kernels``."""

import sys
import types
from pathlib import Path

try:
    import linearize  # noqa: F401
except ImportError as e:
    print(f"note: `import linearize` failed ({e}); loading linearize.kernels without the package __init__")
    pkg = types.ModuleType("linearize")
    pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "linearize")]
    sys.modules["linearize"] = pkg
