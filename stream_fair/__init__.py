"""stream-fair: a streaming fairness drift detector.

The pure core (events, decoding, join, group keys, counts, fairness math, feedback indicators,
tracker) imports neither Kafka nor Prometheus; the I/O lives at the edges (``transport``,
``exporter``, ``app``).
"""

from __future__ import annotations

__version__ = "0.1.0"
