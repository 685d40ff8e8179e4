"""harness: benchmark and distil few-step text-to-image diffusion samplers through plugins."""

from harness.hooks.specs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
