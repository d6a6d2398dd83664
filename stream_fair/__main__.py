"""``python -m stream_fair`` is the ``stream-fair`` command."""

from __future__ import annotations

import sys

from stream_fair.cli import main

sys.exit(main())
