"""moepack: pack Mixture-of-Experts language models into the memory of one edge machine."""
from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
