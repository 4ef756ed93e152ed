"""vlmedge: vision-language models at the edge.

Import packages map onto the repository's top-level folders (DESIGN.md):
vlmedge.runtime (runtime/), vlmedge.export (export/), vlmedge.calibration
(calibration/), vlmedge.benchmarks (benchmarks/), vlmedge.demo (demo/).
This package holds only the shared contract and never imports torch.
"""
__version__ = "0.1.0"
