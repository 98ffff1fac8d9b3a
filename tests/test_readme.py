"""Every ```python block of README.md runs as written (in order, one namespace), against a tiny
model standing in for 'demo', in a folder holding a context.wav."""
import re
from pathlib import Path

import numpy as np
import soundfile as sf

import stemgen.engine.models as models

from helpers import tiny_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.setattr(models, "DEMO_DIR", tiny_model_dir(tmp_path))
    monkeypatch.chdir(tmp_path)
    t = np.arange(3 * 44100) / 44100
    sf.write("context.wav", np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 330 * t)], 1) * 0.3, 44100)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert sf.info("bass.wav").frames == 3 * 32000
    assert namespace["stem"].shape[-1] == 3 * 32000
