#!/usr/bin/env bash
# The demo model (engine/demo_model/), exactly as it was trained: corpora, the codec's five
# stages, the LM and its listening push, conversion, Table 3. Run from an empty folder with the `stemgen` CLI installed with
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

# Stage 5: the harmony (chroma) term. Until here the codec kept a pad's chord root on 7.5% of bars
# and a bass's context's on 12.5% (`stemgen codec-harmony`): no LM on its tokens could hear the
# chords. 1,200 steps, 23.5 min here: pad 0.96, context 0.875 (its first level alone 0.80), the bass
# line's root still 1.0.
stemgen train-codec toy-codec --out codec5 --init-from codec4/last.pt --steps 1200 --lr 5e-4 --warmup 20 \
  --l1-weight 30 --bass-weight 1 --chroma-weight 5 --seed 4 --threads 2
stemgen codec-harmony codec5/compression_state_dict.bin --corpus toy-heldout --songs 10

# LM: d 256 x 4 layers, 10 s crops, contexts = one other stem or all others ("rest"); tokenising the
# 200 songs once (20 min) then 2,500 steps in three sittings, each resuming the one before exactly
# (optimizer, schedule, data order, RNG): steps 0-1100, 1100-1300, 1300-2500 (143 min).
stemgen train toy-train --codec codec5/compression_state_dict.bin --out lm5 --contexts rest \
  --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 2500 --lr 1.5e-3 --warmup 100 \
  --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 0 --threads 2
# Listening push: half the pairs trained as the sampler's first step (target fully masked), from the
# LM above, its token cache copied over; run as 400 steps, then resumed exactly to 800 (36 min). The
# probe's chord root of the LM's first-step bass: 0.128 -> 0.177 -> 0.637 (NULL context 0.100).
mkdir -p lm5b && cp -r lm5/tokens lm5b/
stemgen train toy-train --codec codec5/compression_state_dict.bin --out lm5b --init-from lm5/model.pt \
  --blank-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 800 \
  --lr 5e-4 --warmup 20 --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 5 --threads 2
python train/recipes/harmony_probe.py toy-train lm5/tokens --test 8 --lm lm5/model.pt --lm lm5b/model.pt

# Engine files: the LM stored in fp16 by --dtype; the codec then re-stored in fp16 too (half the size).
stemgen convert --lm lm5b/model.pt --codec codec5/compression_state_dict.bin --out demo_model --dtype float16
python -c "from safetensors.torch import load_file, save_file; p = 'demo_model/codec.safetensors'; save_file({k: v.half() for k, v in load_file(p).items()}, p, metadata={'format': 'stemgen-engine', 'part': 'codec'})"
# Table 3 of that model (README's round 1; bench/table3-demo-lm5b.json), about 15 min here:
stemgen table3 --model demo_model --corpus toy-heldout --out t3 --songs 40 --seconds 6 --steps 12,6,4,4

# Round 2: that LM, as stored in fp16, trained 3,000 more steps the same way
# (half the pairs as the first step), 1 thread at nice 19 beside other work on 2 cores of an Intel
# Xeon (AMX; bf16 autocast): about 90 min of training in two sittings, the second resumed exactly
# (rerun the same command: it continues from lm6/last.pt). The new tokens cache is made on the first
# run (the codec is the same; tokenising 200 songs again takes a while).
python train/recipes/engine_to_train.py demo_model lm6-init/model.pt --preset small --n-layers 4
stemgen train toy-train --codec demo_model --out lm6 --init-from lm6-init/model.pt \
  --blank-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 3000 \
  --lr 5e-4 --warmup 20 --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 200 --seed 6 --threads 1
stemgen convert --lm lm6/model.pt --codec demo_model --out demo_model6 --dtype float16
# (the codec file then copied from demo_model: the same fp16 tensors byte for byte)
cp demo_model/codec.safetensors demo_model6/codec.safetensors
# Table 3 (README's round 2; bench/table3-demo-lm6.json), about 12 min here:
stemgen table3 --model demo_model6 --corpus toy-heldout --out t3-6 --songs 40 --seconds 6 --steps 12,6,4,4
# Round 3: the round-2 LM, as stored in fp16, trained 3,600 more steps the same
# way (half the pairs as the first step; lr 5e-4, decayed x0.3 every 1,200 steps), 2 threads at nice 19
# on 2 cores of an Intel Xeon (AMX; bf16 autocast): tokenising the 200 songs 14 min (1 thread), training
# 47 min (10,300 frames/s). Validation loss 2.07 (step 200) -> 1.80 (step 3,600).
python train/recipes/engine_to_train.py demo_model6 lm7-init/model.pt --preset small --n-layers 4
stemgen train toy-train --codec demo_model6 --out lm7 --init-from lm7-init/model.pt \
  --blank-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 3600 \
  --lr 5e-4 --warmup 20 --decay-every 1200 --decay-rate 0.3 --val-songs 8 --val-every 200 --seed 7 --threads 2
stemgen convert --lm lm7/model.pt --codec demo_model6 --out demo_model7 --dtype float16
cp demo_model6/codec.safetensors demo_model7/codec.safetensors
# Table 3 (README; bench/table3-demo-lm7.json), 5 min here; its int8 run (README, Performance;
# bench/table3-demo-lm7-int8.json) is the same command with --dtype int8:
stemgen table3 --model demo_model7 --corpus toy-heldout --out t3-7 --songs 40 --seconds 6 --steps 12,6,4,4 --dtype float32

# Round 5: round 3's LM (lm7/model.pt) on 600 songs of the same seed (the first 200 are toy-train's
# songs, byte for byte), half of the pairs with the whole band as the context (--full-context-prob);
# 3,000 steps, 2 threads on 2 cores of an Intel Xeon (AMX; bf16 autocast), about 37 min at 10,500-11,200
# frames/s. (Here the token cache of tracks 1-200 was lm7's and tracks 201-600 were tokenised on their own,
# by the same per-track tokeniser, 17 min; `stemgen train` alone tokenises all 600.)
stemgen make-corpus toy-train600 --songs 600 --seed 0
stemgen train toy-train600 --codec demo_model7 --out lm10 --init-from lm7/model.pt \
  --blank-prob 0.5 --full-context-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 \
  --steps 3000 --lr 5e-4 --warmup 20 --decay-every 1200 --decay-rate 0.3 --val-songs 8 --val-every 200 --seed 10 --threads 2
# Round 6 (the demo shipped now): round 5's LM on 1,200 songs of the same seed (the first 600 as above),
# 3,600 steps; 2 threads on the Intel Xeon, 48 min (10,000-10,700 frames/s). (Tracks 1-600's tokens reused from lm10, tracks 601-1200
# tokenised on their own, 28 min beside other work.)
stemgen make-corpus toy-train1200 --songs 1200 --seed 0
stemgen train toy-train1200 --codec demo_model7 --out lm11 --init-from lm10/model.pt \
  --blank-prob 0.5 --full-context-prob 0.5 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 \
  --steps 3600 --lr 5e-4 --warmup 50 --decay-every 1200 --decay-rate 0.3 --val-songs 8 --val-every 200 --seed 11 --threads 2
# Engine files: the LM in fp16 with its own default sampling: no guidance, random unmasking order
# (Table 3's "naive"), chosen on 40 songs of a corpus of seed 2000 (neither trained on nor Table 3's):
# the bass's chord roots per sampler setting, round 5's LM (bench/listening-knobs-tune-round5.md; 1 thread
# beside the tokenising) and round 6's (bench/listening-knobs-tune-round6.md; 2 threads, 5.5 min).
stemgen make-corpus toy-tune --songs 40 --seed 2000
stemgen convert --lm lm10/model.pt --codec demo_model7 --out demo_model10 --dtype float16
cp demo_model7/codec.safetensors demo_model10/codec.safetensors
OMP_NUM_THREADS=1 python bench/listening_knobs.py --corpus toy-tune --songs 40 --model demo_model10 \
  --instruments bass,drums --json tune5.json --md tune5.md paper naive "multi1.5:cfg_context=1.5,cfg_instrument=1.5" \
  "multi2:cfg_context=2,cfg_instrument=2" "single2:guidance=single,cfg_scale=2" "multi3-rank0:w_confidence=0,w_causal=0" \
  "none-rank:guidance=none" "multi1.5-rank0:cfg_context=1.5,cfg_instrument=1.5,w_confidence=0,w_causal=0"
# (stopped after the bass: the drums' runs were not needed)
stemgen convert --lm lm11/model.pt --codec demo_model7 --out demo_model11p --dtype float16
cp demo_model7/codec.safetensors demo_model11p/codec.safetensors
OMP_NUM_THREADS=2 python bench/listening_knobs.py --corpus toy-tune --songs 40 --model demo_model11p \
  --instruments bass --json tune6.json --md tune6.md paper naive "multi1.5:cfg_context=1.5,cfg_instrument=1.5" \
  "multi1:cfg_context=1,cfg_instrument=1" "multi0.5:cfg_context=0.5,cfg_instrument=0.5" "none-rank:guidance=none" \
  "multi1.5-rank0:cfg_context=1.5,cfg_instrument=1.5,w_confidence=0,w_causal=0" "single1.5:guidance=single,cfg_scale=1.5"
stemgen convert --lm lm11/model.pt --codec demo_model7 --out demo_model11 --dtype float16 \
  --sampling guidance=none,w_confidence=0,w_causal=0
cp demo_model7/codec.safetensors demo_model11/codec.safetensors
# Table 3 (README; bench/table3-demo.json), 7 min here; its int8 run (bench/table3-demo-int8.json) adds --dtype int8:
stemgen table3 --model demo_model11 --corpus toy-heldout --out t3-11 --songs 40 --seconds 6 --steps 12,6,4,4 --dtype float32
# The NULL-context control (README; bench/listening-knobs-null.md): the instrument-only guidance row alone
OMP_NUM_THREADS=2 python bench/listening_knobs.py --corpus toy-heldout --songs 40 --model demo_model11 --instruments bass,drums \
  --json null.json --md null.md naive "null:base=naive,guidance=multi,cfg_context=0,cfg_instrument=1"

# ---- Tried after round 3, not shipped (README, "Where the bass loses the harmony") ----
# Round 4 (tried, not shipped: Table 3 no better, bench/table3-demo-lm8-deep.json): round 3's LM
# (lm7/model.pt, its fp32 weights) deepened 4 -> 8 layers without changing its output, then 3,000 steps
# the same way; 2 threads at nice 19 on the Intel Xeon, 75 min (5,360 frames/s); validation loss 1.60.
# mkdir -p lm8 && cp -r lm7/tokens lm8/
# python train/recipes/deepen_lm.py lm7/model.pt lm8-init/model.pt --n-layers 8
# stemgen train toy-train --codec demo_model7 --out lm8 --init-from lm8-init/model.pt \
#   --blank-prob 0.5 --contexts rest --preset small --n-layers 8 --frames 500 --batch-size 16 --steps 3000 \
#   --lr 5e-4 --warmup 50 --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 200 --seed 8 --threads 2
# stemgen convert --lm lm8/model.pt --codec demo_model7 --out demo_model8 --dtype float16
# cp demo_model7/codec.safetensors demo_model8/codec.safetensors
# stemgen table3 --model demo_model8 --corpus toy-heldout --out t3-8 --songs 40 --seconds 6 --steps 12,6,4,4 --dtype float32
# Round 4b (tried, not shipped: Table 3 worse, bench/table3-demo-lm9-blank09.json): round 3's LM trained
# 1,500 more steps with 90% of the pairs as the sampler's first step; 26 min on the Intel Xeon.
# mkdir -p lm9 && cp -r lm7/tokens lm9/
# stemgen train toy-train --codec demo_model7 --out lm9 --init-from lm7/model.pt \
#   --blank-prob 0.9 --contexts rest --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 1500 \
#   --lr 5e-4 --warmup 20 --decay-every 600 --decay-rate 0.3 --val-songs 8 --val-every 250 --seed 9 --threads 2
# (then convert and table3 as for round 4)

# ---- Earlier demos, for the README's history (not needed for the files shipped) ----
# The first demo: an LM on the stage-4 codec's tokens (2,800 steps in three sittings; steps 0-2100 ran
# with a trainer that never dropped the context, fixed at 2100); its bass chord roots were at chance
# (bench/table3-stage4.json). Then the same LM options on the stage-5 codec without the push (lm5
# above): chord roots still at chance (bench/table3-stage5.json).
# stemgen train toy-train --codec codec4/compression_state_dict.bin --out lm --contexts rest \
#   --preset small --n-layers 4 --frames 500 --batch-size 16 --steps 2800 --lr 1.5e-3 --warmup 100 \
#   --decay-every 1000 --decay-rate 0.3 --val-songs 8 --val-every 100 --seed 0 --threads 2
