"""Engine Encodec vs two independent references (random weights), each saved in its real file
format, converted by `stemgen convert`'s codec path and loaded by the engine."""
import math

import pytest
import torch
from safetensors.torch import save_file

from stemgen.engine.codec import load_codec
from stemgen.engine.config import ModelFormatError
from stemgen.weights_convert.codec import convert_codec

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
import encodec  # noqa: F401,E402  (reference dependency, dev extra)
import transformers  # noqa: F401,E402

SEANET_32K = dict(channels=1, dimension=128, n_filters=64, ratios=[8, 5, 4, 4], n_residual_layers=1,
                  true_skip=True, pad_mode="constant", causal=False, norm="weight_norm", lstm=2, compress=2)
XP_CFG = """\
sample_rate: 32000
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 64
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {alpha: 1.0}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder: {trim_right_ratio: 1.0, final_activation: null, final_activation_params: null}
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 2048
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
"""


def make_audio(sr: int, seconds: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(sr * seconds)) / sr
    x = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.2 * torch.sin(2 * math.pi * 331 * t * (1 + 0.1 * t))
    x = x + 0.05 * torch.randn(t.shape, generator=g)
    return x.view(1, 1, -1)


def randomise(module, codebooks, z_scale: float, seed: int = 0):
    """Perturb weight-norm gains (so folding matters) and fill the codebooks: RVQ level k gets
    entries on the scale of the residual it sees."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g") or name.endswith("original0"):
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
        for k, embed in enumerate(codebooks):
            embed.copy_(torch.randn(embed.shape, generator=g) * z_scale * 0.6 ** k)


def rel_rms(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def frame_agreement(a, b):
    """Fraction of frames whose codes agree on every level; a, b [B, Q, T]."""
    return float((a == b).all(dim=1).float().mean())


def check_engine(codec, ref_codes, ref_decode, x):
    codes = codec.encode(x)
    assert codes.shape == ref_codes.shape
    assert frame_agreement(codes, ref_codes) >= 0.999
    audio = codec.decode(ref_codes)
    ref_audio = ref_decode(ref_codes)
    assert audio.shape == ref_audio.shape
    assert rel_rms(audio, ref_audio) <= 1e-4, rel_rms(audio, ref_audio)


def test_audiocraft_export_parity(tmp_path):
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    torch.manual_seed(0)
    enc, dec = SEANetEncoder(**SEANET_32K), SEANetDecoder(**SEANET_32K)
    rvq = ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048)
    x = make_audio(32000)
    with torch.no_grad():
        z_scale = float(enc(x).std())
    model = torch.nn.ModuleDict({"encoder": enc, "decoder": dec, "quantizer": rvq}).eval()
    randomise(model, [layer._codebook.embed for layer in rvq.vq.layers], z_scale)
    src = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": model.state_dict(), "xp.cfg": XP_CFG, "version": "1.3.0", "exported": True}, src)

    cfg, weights = convert_codec(src)
    assert cfg.sample_rate == 32000 and cfg.n_q == 4 and cfg.pad_mode == "constant" and cfg.true_skip
    assert not any("embed_avg" in k or "cluster_size" in k or "inited" in k for k in weights)
    save_file(weights, tmp_path / "codec.safetensors")
    codec = load_codec(tmp_path / "codec.safetensors", cfg)
    with torch.no_grad():
        ref_codes = rvq.encode(enc(x), sample_rate=50).transpose(0, 1)  # [B, Q, T]
        check_engine(codec, ref_codes, lambda c: dec(rvq.decode(c.transpose(0, 1))), x)
    assert ref_codes.shape[-1] == 150


def hf_32k_model():
    from transformers import EncodecConfig, EncodecModel

    conf = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                         codebook_size=2048, hidden_size=128, codebook_dim=128, use_causal_conv=False,
                         pad_mode="reflect", normalize=False, use_conv_shortcut=False, num_lstm_layers=2,
                         target_bandwidths=[2.2], compress=2, residual_kernel_size=3, dilation_growth_rate=2,
                         chunk_length_s=None, overlap=None)
    torch.manual_seed(1)
    return EncodecModel(conf).eval()


@pytest.mark.parametrize("layout", ["safetensors", "bin-weight_g"])
def test_hf_encodec_parity(tmp_path, layout):
    model = hf_32k_model()
    x = make_audio(32000)
    with torch.no_grad():
        z_scale = float(model.encoder(x).std())
    randomise(model, [layer.codebook.embed for layer in model.quantizer.layers], z_scale, seed=1)
    folder = tmp_path / "encodec_32khz"
    if layout == "safetensors":
        model.save_pretrained(folder)  # parametrizations.weight.original0/1 spelling
    else:  # the older weight_g / weight_v spelling in pytorch_model.bin
        folder.mkdir()
        model.config.to_json_file(folder / "config.json")
        sd = {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v for k, v in model.state_dict().items()}
        torch.save(sd, folder / "pytorch_model.bin")
    cfg, weights = convert_codec(folder)
    assert cfg.pad_mode == "reflect" and cfg.n_q == 4 and cfg.bins == 2048
    save_file(weights, tmp_path / "codec.safetensors")
    codec = load_codec(tmp_path / "codec.safetensors", cfg)
    with torch.no_grad():
        ref_codes = model.encode(x, bandwidth=2.2).audio_codes[0]  # [B, Q, T]
        check_engine(codec, ref_codes, lambda c: model.decode(c[None], [None]).audio_values, x)


def test_encodec_package_24khz_th(tmp_path):
    from encodec import EncodecModel

    torch.manual_seed(2)
    model = EncodecModel._get_model([1.5, 3.0, 6.0, 12.0, 24.0], 24000, 1, causal=True).eval()
    model.set_target_bandwidth(24.0)
    x = make_audio(24000, 2.0)
    with torch.no_grad():
        z_scale = float(model.encoder(x).std())
    randomise(model, [layer._codebook.embed for layer in model.quantizer.vq.layers], z_scale, seed=2)
    src = tmp_path / "encodec_24khz-test.th"
    torch.save(model.state_dict(), src)
    cfg, weights = convert_codec(src)
    assert cfg.sample_rate == 24000 and cfg.causal and not cfg.true_skip and cfg.n_q == 32
    save_file(weights, tmp_path / "codec.safetensors")
    codec = load_codec(tmp_path / "codec.safetensors", cfg)
    with torch.no_grad():
        (ref_codes, _), = model.encode(x)
        check_engine(codec, ref_codes, lambda c: model.decode([(c, None)]), x)


def test_codec_source_errors(tmp_path):
    ptr = tmp_path / "compression_state_dict.bin"
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.3.0"}, ptr)
    with pytest.raises(ModelFormatError, match="holds no weights.*facebook/encodec_32khz"):
        convert_codec(ptr)
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="without config.json"):
        convert_codec(empty)
    txt = tmp_path / "codec.bin"
    txt.write_text("nope")
    with pytest.raises(ModelFormatError, match="unknown codec format"):
        convert_codec(txt)
