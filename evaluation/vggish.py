"""VGGish embeddings for FAD (the network published FAD figures use). Weights come from the usual
VGGish checkpoint (the PyTorch port's ``vggish-10086976.pth`` state dict, read with
``torch.load(weights_only=True)``), converted once to safetensors with `stemgen convert-vggish`.
Embeddings are the raw 128-d output (no PCA/quantisation post-processing)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .fad import log_mel, to_16k_mono


class VGGishNet(nn.Module):
    """Same layer layout and names as the common PyTorch port (features.N / embeddings.N)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                        nn.Linear(4096, 128), nn.ReLU())

    def forward(self, x):  # x [B, 1, 96, 64] log-mel patches
        x = self.features(x).permute(0, 2, 3, 1).contiguous()  # channels last, as the TF original flattens
        return self.embeddings(x.flatten(1))


def vggish_state(src: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a VGGish checkpoint (.pth/.pt state dict or converted .safetensors)."""
    from ..engine.config import ModelFormatError

    src = Path(src)
    if not src.is_file():
        raise ModelFormatError(f"{src}: no such VGGish weight file")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(src))
    else:
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelFormatError(f"{src}: cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{src}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("pproc.")}
    expected = {k: tuple(v.shape) for k, v in VGGishNet().state_dict().items()}
    for k, shape in expected.items():
        if k not in state:
            raise ModelFormatError(f"{src}: missing VGGish tensor {k!r}")
        if tuple(state[k].shape) != shape:
            raise ModelFormatError(f"{src}: VGGish tensor {k!r} has shape {list(state[k].shape)}, expected {list(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ModelFormatError(f"{src}: unexpected tensor {extra[0]!r} (not a VGGish state dict)")
    return {k: state[k].float().contiguous() for k in expected}


def convert_vggish(src: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    state = vggish_state(src)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "stemgen-vggish"})
    tmp.replace(out)
    return out


def examples(audio: np.ndarray, sr: int) -> np.ndarray:
    """Non-overlapping 0.96 s log-mel patches [n, 96, 64] (VGGish's input)."""
    lm = log_mel(to_16k_mono(audio, sr))
    n = max(1, len(lm) // 96)
    if len(lm) < 96:
        lm = np.pad(lm, ((0, 96 - len(lm)), (0, 0)), constant_values=np.log(0.01))
    return np.stack([lm[i * 96:(i + 1) * 96] for i in range(n)])


class VGGishEmbedder:
    name = "vggish"

    def __init__(self, weights: str | Path):
        self.net = VGGishNet()
        self.net.load_state_dict(vggish_state(weights))
        self.net.eval()

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray, sr: int) -> np.ndarray:
        x = torch.from_numpy(examples(audio, sr)).float()[:, None]
        return self.net(x).numpy().astype(np.float64)
