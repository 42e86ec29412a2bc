"""mlx-pref: preference optimization for language models, native to MLX."""

from mlx_pref import backend as _backend

# Must run before anything imports mlx.core: on Linux CPU it makes MLX's matmuls use OpenBLAS.
_backend.load_fast_blas()

__version__ = "0.1.0"
