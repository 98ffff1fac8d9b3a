"""Reading users' checkpoint files: pickles with weights_only=True (no code runs), one clear error."""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.errors import ModelFormatError


def read_pickle(path: Path) -> object:
    """A user's pickle, read with weights_only=True (no code runs); any failure is one ModelFormatError."""
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():   # torch's notes on pickle protocols are not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text advises weights_only=False (never here); its own reason is on a later line
        why = [ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in str(e).splitlines()]
        detail = next((ln for ln in why[1:] if ln and "weights_only" not in ln and "torch.load" not in ln), "")
        detail = detail.split(". ")[0][:120]
        if "GLOBAL" in detail or "global" in detail:   # a class or function the file would import: objects
            raise ModelFormatError(f"{path}: holds objects other than tensors and plain containers ({detail}); "
                                   "this engine never runs code from a checkpoint: save the model's state_dict "
                                   "(torch.save(model.state_dict(), path)) and convert that") from None
        raise ModelFormatError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt, truncated or another "
                               f"format): {detail or 'not a pickle torch.load reads'}") from None
    except Exception as e:  # torch raises many types for corrupt / foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt, truncated or "
                               f"another format): {first[:200]}") from None


def looks_like_torch_file(path: Path) -> bool:
    """A torch.save zip container or a legacy pickle, judged from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


class PickleFile:
    """A user's checkpoint file, unpickled at most once however many detectors and readers ask
    (format detection, the reader, the training window: a large checkpoint is read one time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._obj, self._read = None, False

    def load(self) -> object:
        """The unpickled object; one ModelFormatError if the file is not a readable checkpoint."""
        if not self._read:
            self._obj, self._read = read_pickle(self.path), True
        return self._obj

    def load_if_torch(self) -> object:
        """For detectors: the object, or None if the path is not a PyTorch checkpoint file at all."""
        if not self._read and not (self.path.is_file() and looks_like_torch_file(self.path)):
            return None
        return self.load()


def pickle_file(src: str | Path | PickleFile) -> PickleFile:
    return src if isinstance(src, PickleFile) else PickleFile(src)
