"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: Triton's ahead-of-time
compiler and its bundled ptxas produce the cubin here, and cuobjdump reads its registers, local
memory (spills) and instructions. This checks what the CPU interpreter cannot: that the kernels
lower to real GPU code at StemGen's shapes (bf16, d_model 1024, head dim 64/128, 2048 codes), fit
the register file without spilling, that attention's dots use Hopper's wgmma (HGMMA), and that
the memory-bound kernels read 16 bytes per access (LDG.E.128).
It says nothing about speed.

    python tests/compile_sm90.py [--json]   # table (or JSON) of every variant
    PYTHONPATH=DIR python tests/compile_sm90.py   # with another Triton installed in DIR (the GPU
                                                  # machines have 3.6): pip install --target DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from stemgen.kernels import (attention_triton, embedding_triton, magnet_sampling_triton, norm_triton, sampling_triton,
                             swiglu_triton)

P16 = [["tt.divisibility", 16]]   # pointers the runtime sees 16-byte aligned (fresh torch tensors are)


@dataclass
class Variant:
    name: str
    kernel: object
    types: dict            # argument -> Triton type ("*bf16", "i32", "fp32"); constexprs separately
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    wgmma: bool = False    # expect HGMMA in the SASS
    div16: tuple = ()      # int arguments that are multiples of 16 at these shapes (the JIT specialises them)
    wide: bool = False     # memory-bound: expect 16-byte global loads (LDG.E.128)
    tma: bool = False      # expect tensor-memory-accelerator loads (UTMALDG) in the SASS


def _attrs(v: "Variant") -> dict:
    names = v.kernel.arg_names
    return {(names.index(a),): P16 for a, t in v.types.items() if t.startswith("*") or a in v.div16}


def variants() -> list[Variant]:
    bf, f32 = "*bf16", "*fp32"
    emb = {"tok_ptr": "*i64", "cond_ptr": "*i64", "tab_ptr": bf, "ctab_ptr": bf, "coff_ptr": "*i64", "out_ptr": bf,
           "T": "i32", "DC": "i32", "ROWS_PER_LEVEL": "i32"}
    rope = {"q_ptr": bf, "k_ptr": bf, "qo_ptr": bf, "ko_ptr": bf, "cu_ptr": "*i32", "cos_ptr": f32, "sin_ptr": f32,
            "q_scale": "fp32", "sqn": "i32", "sqh": "i32", "sqd": "i32", "skn": "i32", "skh": "i32", "skd": "i32",
            "HALF": "i32", "DH": "i32"}
    flash = {"q_ptr": bf, "k_src": bf, "v_src": bf, "out_ptr": bf, "cu_ptr": "*i32", "cos_ptr": f32, "sin_ptr": f32,
             "q_scale": "fp32", "sqn": "i32", "sqh": "i32", "sqd": "i32", "skn": "i32", "skh": "i32", "skd": "i32",
             "svn": "i32", "svh": "i32", "svd": "i32", "son": "i32", "soh": "i32", "sod": "i32", "DH": "i32"}
    norm = {"x_ptr": bf, "delta_ptr": bf, "w_ptr": bf, "xo_ptr": bf, "out_ptr": bf, "D": "i32", "eps": "fp32"}
    silu = {"gu_ptr": bf, "out_ptr": bf, "HID": "i32"}
    samp = {"logits_ptr": f32, "w_ptr": f32, "pos_ptr": "*i64", "masked_ptr": "*i8", "tok_ptr": "*i64",
            "prob_ptr": f32, "score_ptr": f32, "M": "i32", "V": "i32", "length": "fp32", "key_sample": "i64",
            "key_rank": "i64", "inv_temp": "fp32", "w_confidence": "fp32", "w_causal": "fp32", "w_random": "fp32",
            "top_k": "i32", "top_p": "fp32"}
    # unit strides: the JIT specialises an int argument equal to 1 into a constant
    unit = ("sqd", "skd", "svd", "sod")
    rope = {k: t for k, t in rope.items() if k not in unit}
    flash = {k: t for k, t in flash.items() if k not in unit}
    ones = {k: 1 for k in unit}
    strides = ("sqn", "sqh", "skn", "skh", "HALF", "DH")
    block, warps = embedding_triton.embed_blocks(512)
    out = [Variant("embed-sum bf16 C2 Q4 d512/ch", embedding_triton._embed_sum_kernel, emb,
                   dict(C=2, Q=4, S=1, BLOCK_D=block), num_warps=warps, div16=("DC",), wide=True)]
    for dh, rotate_q in ((64, True), (128, True), (64, False)):
        out.append(Variant(f"rope {'q,k' if rotate_q else 'k'} bf16 dh{dh}", attention_triton._rope_kernel, rope,
                           dict(BLOCK=32, HALF_P=dh // 2, ROTATE_Q=rotate_q, sqd=1, skd=1), div16=strides,
                           wide=True))
    # the configurations the wrapper picks (attention_triton.attention_config), then the ones the GPU
    # sweep (bench/attn_sweep.py) tries: RoPE in the flash kernel, unmasked key blocks, acc in the dot
    bf16_64 = attention_triton.attention_config(torch.bfloat16, 64)
    configs = [(dh, torch.bfloat16, attention_triton.attention_config(torch.bfloat16, dh)) for dh in (64, 128)]
    configs += [(dh, torch.float32, attention_triton.attention_config(torch.float32, dh)) for dh in (64, 128)]
    configs += [(64, torch.bfloat16, dataclasses.replace(bf16_64, rope=r, split_tail=True, acc_in_dot=True))
                for r in ("kernel", "q", "fused")]
    configs += [(64, torch.bfloat16, dataclasses.replace(bf16_64, block_m=128, warps=8, rope="fused", split_tail=True,
                                                         acc_in_dot=True))]
    configs += [(64, torch.bfloat16, dataclasses.replace(bf16_64, rope=r, split_tail=True, acc_in_dot=True, tma=True))
                for r in ("q", "fused")]
    # (not fp32 with TMA: at the fp32 tiles it spills, 440 bytes a thread under Triton 3.8; FlashConfig says so)
    configs += [(64, torch.bfloat16, dataclasses.replace(bf16_64, tma=True))]
    for dh, dt, c in configs:
        fp32 = dt == torch.float32
        types = {**flash, **{k: f32 for k in ("q_ptr", "k_src", "v_src", "out_ptr")}} if fp32 else flash
        if c.tma:   # k and v as tensor descriptors of [BLOCK_N, dh] blocks (k in halves when rotated here)
            e = "fp32" if fp32 else "bf16"
            types = dict(types, k_src=f"tensordesc<{e}[{c.block_n}, {dh // 2 if c.rope == 'fused' else dh}]>",
                         v_src=f"tensordesc<{e}[{c.block_n}, {dh}]>")
        extra = "" if c == attention_triton.attention_config(dt, dh) else \
            f" {c.block_m}x{c.block_n} rope={c.rope} split={int(c.split_tail)} acc={int(c.acc_in_dot)}" + \
            (" tma" if c.tma else "")
        out.append(Variant(f"flash attention {'fp32' if fp32 else 'bf16'} dh{dh}{' (ieee)' if fp32 else ''}{extra}",
                           attention_triton._flash_kernel, types,
                           dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, DH_P=dh, IEEE=fp32, ROPE_Q=c.rope != "kernel",
                                ROPE_K=c.rope == "fused", SPLIT_TAIL=c.split_tail, ACC_IN_DOT=c.acc_in_dot, TMA=c.tma,
                                **ones),
                           num_warps=c.warps, num_stages=c.stages, wgmma=not fp32, tma=c.tma,
                           div16=("sqn", "sqh", "skn", "skh", "svn", "svh", "son", "soh", "DH")))
    for delta in (False, True):
        out.append(Variant(f"rms-norm bf16 d1024{' + residual add' if delta else ''}", norm_triton._rms_norm_kernel, norm,
                           dict(HAS_DELTA=delta, BLOCK_D=1024), div16=("D",), wide=True))
    out.append(Variant("silu * up bf16 h2816", swiglu_triton._silu_mul_kernel, silu, dict(BLOCK=1024), div16=("HID",),
                       wide=True))
    for label, c in [
            ("guide+sample R3 V2048", dict(R=3, GREEDY=False, BLOCK_V=2048, ONE_BLOCK=True, TOP_K=False,
                                           TOP_P=False)),
            ("guide+sample R3 V2048 top-k + top-p", dict(R=3, GREEDY=False, BLOCK_V=2048, ONE_BLOCK=True,
                                                         TOP_K=True, TOP_P=True)),
            ("guide+sample R3 V4096 top-k + top-p", dict(R=3, GREEDY=False, BLOCK_V=4096, ONE_BLOCK=True,
                                                         TOP_K=True, TOP_P=True)),
            ("guide+sample R3 V2048 greedy", dict(R=3, GREEDY=True, BLOCK_V=2048, ONE_BLOCK=True, TOP_K=False,
                                                  TOP_P=False)),
            ("guide+sample R3 V8192 blockwise", dict(R=3, GREEDY=False, BLOCK_V=1024, ONE_BLOCK=False,
                                                     TOP_K=False, TOP_P=False))]:
        warps = sampling_triton.sample_warps(c["BLOCK_V"], c["TOP_K"] or c["TOP_P"])   # as the wrapper picks
        out.append(Variant(label, sampling_triton._guide_sample_kernel, samp, c, num_warps=warps, div16=("V",),
                           wide=c["ONE_BLOCK"]))
    mag = {"logits_ptr": f32, "pos_ptr": "*i64", "tok_ptr": "*i64", "prob_ptr": f32, "M": "i32", "V": "i32",
           "key": "i64", "coef": "fp32", "temperature": "fp32", "top_k": "i32", "top_p": "fp32"}
    for label, c in [("MAGNeT sample R2 V2048 top-p", dict(R=2, BLOCK_V=2048, TOP_K=False, TOP_P=True)),
                     ("MAGNeT sample R2 V2048 top-k", dict(R=2, BLOCK_V=2048, TOP_K=True, TOP_P=False)),
                     ("MAGNeT sample R1 V4096 top-p", dict(R=1, BLOCK_V=4096, TOP_K=False, TOP_P=True))]:
        out.append(Variant(label, magnet_sampling_triton._magnet_sample_kernel, mag, c,
                           num_warps=magnet_sampling_triton.sample_warps(c["BLOCK_V"]), div16=("V",), wide=True))
    return out


@dataclass
class Result:
    name: str
    registers: int
    spill_bytes: int       # register spill stores per thread, from ptxas -v (0: no spills)
    shared_bytes: int      # dynamic shared memory per block
    wgmma: bool
    wgmma_expected: bool
    wide_loads: bool       # 16-byte global loads present
    wide_expected: bool
    tma: bool = False      # TMA loads (UTMALDG) present
    tma_expected: bool = False


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(v: Variant, arch: int = 90) -> Result:
    sig = {**v.types, **{c: "constexpr" for c in v.constexprs}}
    missing = set(v.kernel.arg_names) - set(sig)
    if missing:
        raise ValueError(f"{v.name}: no type for {sorted(missing)}")
    src = ASTSource(fn=v.kernel, signature={a: sig[a] for a in v.kernel.arg_names}, constexprs=v.constexprs,
                    attrs=_attrs(v))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        ptxas = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}a", "-v", os.path.join(d, "k.ptx"), "-o",
                                os.path.join(d, "again.cubin")], capture_output=True, text=True, check=True)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(part.split(":", 1) for part in usage.split("Function", 1)[1].split(":", 1)[1].split()
                  if ":" in part)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas.stdout + ptxas.stderr))
    return Result(v.name, int(fields["REG"]), spills, int(k.metadata.shared),
                  "HGMMA" in sass, v.wgmma, "LDG.E.128" in sass, v.wide, "UTMALDG" in sass, v.tma)


def spill_probe() -> Variant:
    """A flash block too large for the register file: must be reported as spilling (0.8-1 KB a
    thread; a 256x256 dh128 block spills 15 KB but takes ptxas ten times as long)."""
    v = next(v for v in variants() if v.name == "flash attention bf16 dh64")
    return Variant("flash 128x128 dh64 (spill probe)", v.kernel, v.types,
                   dict(v.constexprs, BLOCK_M=128, BLOCK_N=128), num_warps=4)


def main(argv=None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--probe", action="store_true", help="compile only the spill probe")
    ap.add_argument("--with-probe", action="store_true", help="compile every kernel and then the spill probe")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    todo = [spill_probe()] if args.probe else variants() + ([spill_probe()] if args.with_probe else [])
    results = [compile_variant(v) for v in todo]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
        return results
    print(f"Triton {triton.__version__}, target sm_90 (H100/H200); compiled here, no GPU used")
    w = max(len(r.name) for r in results)
    print(f"{'kernel':{w}s} {'regs':>5s} {'spill B':>8s} {'smem B':>8s}  {'wgmma':14s} {'16-byte loads':16s} TMA loads")
    for r in results:
        print(f"{r.name:{w}s} {r.registers:5d} {r.spill_bytes:8d} {r.shared_bytes:8d}  "
              f"{('yes' if r.wgmma else 'no') + (' (expected)' if r.wgmma_expected else ''):14s} "
              f"{('yes' if r.wide_loads else 'no') + (' (expected)' if r.wide_expected else ''):16s} "
              f"{'yes' if r.tma else 'no'}{' (expected)' if r.tma_expected else ''}")
    return results


if __name__ == "__main__":
    main()
