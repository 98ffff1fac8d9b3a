#!/usr/bin/env bash
# The demo model (engine/demo_model/), exactly as it was trained: corpora, the codec's four
# stages, the LM, conversion. Run from an empty folder with the `stemgen` CLI installed with
# the training extra (pip install -e '.[train]'). CPU: 2 cores; wall times in README.
set -euo pipefail

stemgen make-corpus toy-codec --songs 100 --seed 7     # codec training audio
stemgen make-corpus toy-train --songs 200 --seed 0     # LM training (the last 8 tracks are held out for validation)
stemgen make-corpus toy-heldout --songs 48 --seed 1000 # Table 3: a seed never trained on

# Codec, stage 1: MR-STFT (2048..256) + 0.1 x waveform L1. (The run was started with --steps 1400,
# stopped at its step-100 checkpoint and resumed with --steps 900: resuming may change the length.)
stemgen train-codec toy-codec --out codec1 --steps 1400 --stop-at 100 --lr 1e-3 --warmup 50 \
  --fft-sizes 2048,1024,512,256 --l1-weight 0.1 --seed 0 --threads 2
stemgen train-codec toy-codec --out codec1 --steps 900 --lr 1e-3 --warmup 50 \
  --fft-sizes 2048,1024,512,256 --l1-weight 0.1 --seed 0 --threads 2
# Stage 2: add 8192/4096-point STFTs (bass pitch), waveform L1 x 1 (stopped at step 200 of 600)
stemgen train-codec toy-codec --out codec2 --init-from codec1/compression_state_dict.bin --steps 600 --stop-at 200 \
  --lr 5e-4 --warmup 20 --l1-weight 1 --seed 1 --threads 2
# Stage 3: add the bass-band (1 kHz) STFT term (stopped at step 100 of 600)
stemgen train-codec toy-codec --out codec3 --init-from codec2/last.pt --steps 600 --stop-at 100 \
  --lr 5e-4 --warmup 20 --l1-weight 1 --bass-weight 1 --seed 2 --threads 2
# Stage 4: waveform L1 x 30 (before, the waveform term was ~1% of the loss and the decoder played a
# fixed 50 Hz buzz instead of the bass line)
stemgen train-codec toy-codec --out codec4 --init-from codec3/last.pt --steps 800 \
  --lr 5e-4 --warmup 20 --l1-weight 30 --bass-weight 1 --seed 3 --threads 2

# LM: d 256 x 4 layers, 10 s crops, contexts = one other stem or all others ("rest"). Trained in
# three sittings, each resuming the one before exactly (optimizer, schedule, data order, RNG): the
# first was stopped after its step-700 checkpoint, the second after step 1500, the third after
# step 2800; the last command (same options, --steps 2800) only writes lm/model.pt from that
# checkpoint. Steps 0-2100 ran with a trainer that never dropped the context (only the
# instrument); the fix (the context is dropped too, SPEC 5) came in at step 2100. This command with
# today's trainer drops both from step 0.
stemgen train toy-train --codec codec4/compression_state_dict.bin --out lm --contexts rest \
  --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 2800 --lr 1.5e-3 --warmup 100 \
  --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 0 --threads 2

stemgen convert --lm lm/model.pt --codec codec4/compression_state_dict.bin --out demo_model --dtype float16
# the LM is stored in fp16 by --dtype; the codec was then re-stored in fp16 too (half the size):
python -c "from safetensors.torch import load_file, save_file; p = 'demo_model/codec.safetensors'; save_file({k: v.half() for k, v in load_file(p).items()}, p, metadata={'format': 'stemgen-engine', 'part': 'codec'})"

# ---- The next demo (in progress; not the files shipped in engine/demo_model yet) ----
# Found in session 6 (`stemgen codec-harmony`): the stage-4 codec keeps a pad's chord root on
# 7.5% of bars and a bass's context's on 12.5% (on the first song the pad comes out 8x quieter), so no LM on its
# tokens can hear the chords. Stage 5 adds the harmony (chroma) term; 1,200 steps, 23.5 min here:
# pad 0.96, context 0.875 (its first level alone 0.80), the bass ceiling still 1.0.
stemgen train-codec toy-codec --out codec5 --init-from codec4/last.pt --steps 1200 --lr 5e-4 --warmup 20 \
  --l1-weight 30 --bass-weight 1 --chroma-weight 5 --seed 4 --threads 2
stemgen codec-harmony codec5/compression_state_dict.bin --corpus toy-heldout --songs 10
# A fresh LM on its tokens (same options as above; three sittings, each resumed exactly: steps
# 0-1100, 1100-1300, 1300-2500; planned as 3000, ended at 2500 (--steps 2500) for the session's time):
stemgen train toy-train --codec codec5/compression_state_dict.bin --out lm5 --contexts rest \
  --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 2500 --lr 1.5e-3 --warmup 100 \
  --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 0 --threads 2
stemgen convert --lm lm5/model.pt --codec codec5/compression_state_dict.bin --out demo_model5 --dtype float16
python -c "from safetensors.torch import load_file, save_file; p = 'demo_model5/codec.safetensors'; save_file({k: v.half() for k, v in load_file(p).items()}, p, metadata={'format': 'stemgen-engine', 'part': 'codec'})"
stemgen table3 --model demo_model5 --corpus toy-heldout --out t3d --songs 40 --seconds 6 --steps 12,6,4,4  # 10 min
# Chords in the tokens (table) and in the LM's first-step bass (--lm; the LM's 8 validation songs):
python train/recipes/harmony_probe.py toy-train lm5/tokens
python train/recipes/harmony_probe.py toy-train lm5/tokens --test 8 --lm lm5/model.pt
# A listening push (half the pairs as the sampler's first step), the token cache copied over; run as
# 400 steps, then resumed exactly to 800 (first-step bass chord root by the probe 0.128 -> 0.177 -> 0.637):
mkdir -p lm5b && cp -r lm5/tokens lm5b/
stemgen train toy-train --codec codec5/compression_state_dict.bin --out lm5b --init-from lm5/model.pt \
  --blank-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 800 \
  --lr 5e-4 --warmup 20 --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 5 --threads 2
