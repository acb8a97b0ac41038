"""Real steps: throughput after warm-up and peak memory (CPU ledger, CUDA allocator).

Used inside the tuner's worker processes and by ``autoscale bench``.
"""

from autoscale.measure._measure import Measurement, measure

__all__ = ["Measurement", "measure"]
