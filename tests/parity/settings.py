"""The parity suite's switches and limits (environment variables set by ``make parity``)."""

from __future__ import annotations

import os

ENABLED = os.environ.get("REFEREE_SYNTH_PARITY") == "1"
FULL = os.environ.get("FULL") == "1"  # the released sizes (manual: about 8 GB of memory, minutes)
TOLERANCE = 1e-5  # absolute, on unrounded fp32 values (the original runs transformers 4.33, the project 5.x)
SUBPROCESS_TIMEOUT = 3600 if FULL else 600  # seconds, for the reference run and the CLI converters
