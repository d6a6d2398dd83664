"""Moved to :mod:`stream_fair.transport`; this alias keeps older imports working.

New code imports :mod:`stream_fair.transport` (the protocol and both clients).
"""

from __future__ import annotations

from stream_fair.transport import *  # noqa: F403
from stream_fair.transport import __all__  # noqa: F401
