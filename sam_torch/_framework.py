"""Imported first by :mod:`sam_torch`: without PyTorch installed, an error that names the extra."""

from sam_core._extras import require

require("sam_torch")
