"""Which torch device a run uses: the one place that reads params `train.device`.

Its own module so that training, the crop cache and evaluation all import it without
importing each other (tasks/train.py imports the crop cache; the crop cache needs the device).
"""

from __future__ import annotations

import torch

from cxr.core.errors import DataError


def pick_device(choice: str) -> torch.device:
    """"auto": CUDA when present, else the CPU; "cuda" without a CUDA device is a DataError."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("params ask for device cuda, but no CUDA device is available", where="params.train.device")
        return torch.device("cuda")
    return torch.device("cpu")
