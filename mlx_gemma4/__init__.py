"""mlx-gemma4: Google's Gemma 4 family on Apple MLX."""

from .runtime import preload_blas as _preload_blas

_preload_blas()  # must run before the first `import mlx.core`

__version__ = "0.1.0"

from .drafter import load_drafter  # noqa: E402
from .loading import load  # noqa: E402

__all__ = ["load", "load_drafter", "__version__"]
