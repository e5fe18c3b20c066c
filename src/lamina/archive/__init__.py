"""OCI layer apply and diff: turn image layers into snapshot content and back.

`apply_layer` applies a layer stream to any directory; `apply_layer_to_upper`
writes an overlay snapshot's upper directory directly. `write_diff` produces
the layer of a snapshot's changes. Errors are `LayerError` (the layer is at
fault) and `LayerWriteError` (the file system failed), both naming the layer
and the entry.
"""

from lamina.archive.apply import ApplyResult, apply_layer, apply_layer_to_upper
from lamina.archive.compression import Compression, detect_compression
from lamina.archive.diff import DiffResult, write_diff
from lamina.archive.errors import LayerDigestError, LayerError, LayerWriteError

__all__ = [
    "ApplyResult",
    "Compression",
    "DiffResult",
    "LayerDigestError",
    "LayerError",
    "LayerWriteError",
    "apply_layer",
    "apply_layer_to_upper",
    "detect_compression",
    "write_diff",
]
