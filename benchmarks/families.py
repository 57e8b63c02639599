"""wam_fast.compile on the other world-action-model families: small random models written the way each
family's own code is (wam_fast has never seen these classes), and a table of what compile does to them.

    python benchmarks/families.py [--device cpu|cuda] [--reps 30] [--out benchmarks/results/families-cpu.json]

Per family: the levers applied (from the compile report), the median forward time of eager,
torch.compile alone and wam_fast.compile (both inductor, measured in one run, after warm-up), the speed
ratios, and the relative L2 error of wam_fast.compile against eager, also with fp8=True. The models are
also the test models of tests/test_compile_patterns.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(t.dtype if t.is_floating_point() else torch.float32)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, D = t.shape
    return t.reshape(B, N, heads, D // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    B, H, N, hd = t.shape
    return t.transpose(1, 2).reshape(B, N, H * hd)


# ---- GR-2 style: a video DiT (DiT / PixArt-alpha blocks) with an action readout -------------------------
class PixArtBlock(nn.Module):
    """adaLN-single table (6 chunks), self-attention, cross-attention to text, gated residuals, tanh GELU."""

    def __init__(self, dim: int, heads: int, text_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q, self.kv, self.cross_out = nn.Linear(dim, dim), nn.Linear(text_dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, t, text):
        table = self.scale_shift_table[None] + t.reshape(t.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads),
                                           split_heads(v, self.heads))
        x = x + gate_msa * self.proj(merge_heads(a))
        k, v = self.kv(text).chunk(2, dim=-1)
        c = F.scaled_dot_product_attention(split_heads(self.q(x), self.heads), split_heads(k, self.heads),
                                           split_heads(v, self.heads))
        x = x + self.cross_out(merge_heads(c))
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class GR2(nn.Module):
    """Video latents + learned action queries through PixArt blocks; predicts the video noise and actions."""

    def __init__(self, patch=16, dim=80, heads=2, depth=2, text_dim=32, actions=7, chunk=8):
        super().__init__()
        self.embed, self.t_proj = nn.Linear(patch, dim), nn.Sequential(nn.Linear(dim, dim), nn.SiLU(),
                                                                      nn.Linear(dim, 6 * dim))
        self.action_queries = nn.Parameter(torch.randn(chunk, dim) * 0.02)
        self.blocks = nn.ModuleList(PixArtBlock(dim, heads, text_dim) for _ in range(depth))
        self.video_head, self.action_head = nn.Linear(dim, patch), nn.Linear(dim, actions)
        self.dim, self.chunk = dim, chunk

    def forward(self, video, timestep, text):
        t = self.t_proj(timestep_embedding(timestep, self.dim))
        x = torch.cat((self.embed(video), self.action_queries.expand(video.shape[0], -1, -1)), dim=1)
        for block in self.blocks:
            x = block(x, t, text)
        return self.video_head(x[:, :-self.chunk]), self.action_head(x[:, -self.chunk:])


def gr2(batch=2):
    return GR2(), {"video": torch.randn(batch, 41, 16), "timestep": torch.rand(batch) * 1000,
                   "text": torch.randn(batch, 12, 32)}


# ---- UniPi style: a video predictor with nn.MultiheadAttention, then inverse dynamics -------------------
class OwnAdaLN(nn.Module):
    def __init__(self, dim, cond):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(cond, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.proj(F.silu(c)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class VideoDiTBlock(nn.Module):
    def __init__(self, dim, heads, cond):
        super().__init__()
        self.adaln1, self.adaln2 = OwnAdaLN(dim, cond), OwnAdaLN(dim, cond)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, c):
        h = self.adaln1(x, c)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.adaln2(x, c))


class UniPi(nn.Module):
    def __init__(self, frame=48, dim=64, cond=32, depth=2, actions=7):
        super().__init__()
        self.embed, self.cond, self.head = nn.Linear(frame, dim), nn.Linear(8, cond), nn.Linear(dim, frame)
        self.blocks = nn.ModuleList(VideoDiTBlock(dim, 4, cond) for _ in range(depth))
        self.inverse_dynamics = nn.Sequential(nn.Linear(2 * frame, dim), nn.ReLU(), nn.Linear(dim, actions))

    def forward(self, frames, task):
        c, h = self.cond(task), self.embed(frames)
        for block in self.blocks:
            h = block(h, c)
        future = self.head(h)
        return future, self.inverse_dynamics(torch.cat((frames, future), dim=-1))


def unipi(batch=2):
    return UniPi(), {"frames": torch.randn(batch, 49, 48), "task": torch.randn(batch, 8)}


# ---- GR00T style: a flow-matching DiT action head, AdaLN, cross-attention, head_dim 48 -------------------
class AdaLayerNorm(nn.Module):
    def __init__(self, dim, temb_dim):
        super().__init__()
        self.linear, self.norm = nn.Linear(temb_dim, 2 * dim), nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_k, self.to_v = nn.Linear(context_dim or dim, dim), nn.Linear(context_dim or dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class GR00TBlock(nn.Module):
    def __init__(self, dim, heads, temb_dim, context_dim=None):
        super().__init__()
        self.norm1, self.attn = AdaLayerNorm(dim, temb_dim), Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.cross = context_dim is not None

    def forward(self, x, context, temb):
        h = self.norm1(x, temb)
        x = self.attn(h, context if self.cross else None) + x
        return self.ff(self.norm3(x)) + x


class GR00T(nn.Module):
    def __init__(self, actions=7, state=9, dim=96, heads=2, depth=4, vl_dim=64):
        super().__init__()
        self.action_in, self.state_in = nn.Linear(actions, dim), nn.Linear(state, dim)
        self.temb = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(GR00TBlock(dim, heads, dim, vl_dim if i % 2 == 0 else None) for i in range(depth))
        self.norm_out, self.action_out = nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, actions)
        self.dim = dim

    def forward(self, noisy_actions, state, vl_tokens, t):
        temb = self.temb(timestep_embedding(t * 1000, self.dim))
        x = torch.cat((self.state_in(state)[:, None], self.action_in(noisy_actions)), dim=1)
        for block in self.blocks:
            x = block(x, vl_tokens, temb)
        return self.action_out(self.norm_out(x)[:, 1:])  # the velocity of each action


def gr00t(batch=2):
    return GR00T(), {"noisy_actions": torch.randn(batch, 16, 7), "state": torch.randn(batch, 9),
                     "vl_tokens": torch.randn(batch, 60, 64), "t": torch.rand(batch)}


# ---- GR-1 style: a causal GPT over [OBS]/[ACT] tokens ----------------------------------------------------
class GPTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)  # nanoGPT style
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        x = x + self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GR1(nn.Module):
    def __init__(self, obs=48, actions=7, dim=64, heads=4, depth=3, steps=12):
        super().__init__()
        self.obs_in, self.act_token = nn.Linear(obs, dim), nn.Parameter(torch.randn(dim) * 0.02)
        self.position = nn.Parameter(torch.randn(2 * steps, dim) * 0.02)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads) for _ in range(depth))
        self.ln_f, self.action_head = nn.LayerNorm(dim), nn.Linear(dim, actions)

    def forward(self, observations):
        B, T, _ = observations.shape
        obs = self.obs_in(observations)
        tokens = torch.stack((obs, self.act_token.expand_as(obs)), dim=2).reshape(B, 2 * T, -1) + self.position[:2 * T]
        for block in self.blocks:
            tokens = block(tokens)
        return self.action_head(self.ln_f(tokens)[:, 1::2])  # the action read at each [ACT] token


def gr1(batch=2):
    return GR1(), {"observations": torch.randn(batch, 12, 48)}


# ---- UVA style: a masked bidirectional transformer, then per-token diffusion heads (MAR's MLP + AdaLN) ---
class ResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        h = self.in_ln(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class DiffusionHead(nn.Module):
    def __init__(self, target, cond, width=64, depth=2):
        super().__init__()
        self.x_in, self.c_in, self.t_in = nn.Linear(target, width), nn.Linear(cond, width), nn.Linear(width, width)
        self.res = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, target)
        self.width = width

    def forward(self, x, t, c):
        h, y = self.x_in(x), self.t_in(timestep_embedding(t, self.width)) + self.c_in(c)
        for block in self.res:
            h = block(h, y)
        return self.out(h)


class UVA(nn.Module):
    def __init__(self, patch=16, actions=7, dim=64, depth=2):
        super().__init__()
        self.embed, self.mask_token = nn.Linear(patch, dim), nn.Parameter(torch.zeros(dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.video_head, self.action_head = DiffusionHead(patch, dim), DiffusionHead(actions, dim)

    def forward(self, video, mask, noisy_video, noisy_action, t):
        x = torch.where(mask[..., None], self.mask_token, self.embed(video))
        z = self.encoder(x)
        B, N, D = z.shape
        video_eps = self.video_head(noisy_video.reshape(B * N, -1), t.repeat_interleave(N), z.reshape(B * N, D))
        action_eps = self.action_head(noisy_action, t, z.mean(dim=1))
        return video_eps.reshape(B, N, -1), action_eps


def uva(batch=2):
    return UVA(), {"video": torch.randn(batch, 49, 16), "mask": torch.rand(batch, 49) < 0.5,
                   "noisy_video": torch.randn(batch, 49, 16), "noisy_action": torch.randn(batch, 7),
                   "t": torch.randint(0, 1000, (batch,)).float()}


# ---- SuSIE style: an image-edit diffusion (a small conv U-Net) and a goal-conditioned policy --------------
class ConvBlock(nn.Module):
    def __init__(self, channels, temb):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(temb, channels)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class SuSIE(nn.Module):
    def __init__(self, channels=32, actions=7):
        super().__init__()
        self.conv_in = nn.Conv2d(6, channels, 3, padding=1)  # noisy goal image + current image
        self.temb = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.down, self.mid, self.up = ConvBlock(channels, channels), ConvBlock(channels, channels), ConvBlock(channels, channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)
        self.policy = nn.Sequential(nn.Conv2d(6, 16, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64),
                                    nn.ReLU(), nn.Linear(64, actions))
        self.channels = channels

    def forward(self, noisy_goal, image, t):
        temb = self.temb(timestep_embedding(t, self.channels))
        h = self.conv_in(torch.cat((noisy_goal, image), dim=1))
        d = self.down(F.avg_pool2d(h, 2), temb)
        u = self.up(F.interpolate(self.mid(d, temb), scale_factor=2.0) + h, temb)
        goal_eps = self.conv_out(u)
        return goal_eps, self.policy(torch.cat((image, noisy_goal - goal_eps), dim=1))


def susie(batch=2):
    return SuSIE(), {"noisy_goal": torch.randn(batch, 3, 32, 32), "image": torch.randn(batch, 3, 32, 32),
                     "t": torch.randint(0, 1000, (batch,)).float()}


FAMILIES = {
    "GR-2 (video DiT + action readout)": gr2,
    "UniPi (video predictor + inverse dynamics)": unipi,
    "GR00T (flow-matching DiT action head)": gr00t,
    "GR-1 (causal GPT over [OBS]/[ACT])": gr1,
    "UVA (masked transformer + diffusion heads)": uva,
    "SuSIE (image-edit diffusion + goal policy)": susie,
}


# ---- the table ---------------------------------------------------------------------------------------------
def timed_ms(fn, reps: int, device: str) -> list:
    """Per-call times in ms after 3 warm-up calls (device events on CUDA)."""
    with torch.no_grad():
        for _ in range(3):  # warm-up (and the compile of a compiled model)
            fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def _leaves(out):
    return list(out) if isinstance(out, tuple) else [out]


def worst_rel_error(a, b) -> float:
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(_leaves(a), _leaves(b)))


def levers(report) -> str:
    counts = {}
    for _, what in report.applied:
        for op in ("adaln_modulate", "gated_residual", "ffn_gelu", "attention"):
            if f"wam_fast.ops.{op}" in what and "traced by" not in what:
                counts[op] = counts.get(op, 0) + 1
    fp8 = sum("FP8Linear" in what for _, what in report.applied)
    parts = [f"{n} {op}" for op, n in counts.items()] + ([f"{fp8} FP8 linears"] if fp8 else [])
    return ", ".join(parts) or "torch.compile only"


def kernel_sites(build) -> tuple:
    """(levers, relative error) of wam_fast.compile with the Triton kernels interpreted on the CPU: the sites a
    GPU gets and their numerics. Run before any kernel module is imported without the interpreter."""
    import wam_fast
    from wam_fast.compiler import CompileConfig, compile_report

    torch.manual_seed(0)
    eager, inputs = build()
    eager = eager.eval()
    kernels = copy.deepcopy(eager)
    wam_fast.compile(kernels, CompileConfig(backend="eager"), example_inputs=inputs)
    with torch.no_grad():
        return levers(compile_report(kernels)), worst_rel_error(kernels(**inputs), eager(**inputs))


def family_row(name: str, build, device: str, reps: int) -> dict:
    import wam_fast
    from wam_fast.compiler import CompileConfig, compile_report

    torch.manual_seed(0)
    eager, inputs = build()
    eager = eager.eval().to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    plain, fast, fp8 = copy.deepcopy(eager), copy.deepcopy(eager), copy.deepcopy(eager)
    plain.compile()
    wam_fast.compile(fast, CompileConfig(backend="inductor"), example_inputs=inputs)
    wam_fast.compile(fp8, CompileConfig(backend="eager", fp8=True), example_inputs=inputs)
    with torch.no_grad():
        want = eager(**inputs)
        error, fp8_error = worst_rel_error(fast(**inputs), want), worst_rel_error(fp8(**inputs), want)
    raw = {label: timed_ms(lambda m=m: m(**inputs), reps, device)
           for label, m in (("eager", eager), ("torch.compile", plain), ("wam_fast.compile", fast))}
    ms = {label: statistics.median(times) for label, times in raw.items()}
    return {"family": name, "levers": levers(compile_report(fast)), "fp8_levers": levers(compile_report(fp8)),
            "kernel_levers": None, "kernel_rel_error": None,
            "ms": ms, "speedup_vs_eager": ms["eager"] / ms["wam_fast.compile"],
            "speedup_vs_torch_compile": ms["torch.compile"] / ms["wam_fast.compile"],
            "rel_error": error, "fp8_rel_error": fp8_error, "raw_ms": raw}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    from wam_fast.utils.environment import environment

    env = environment(args.device)
    print(json.dumps(env))
    interpreted = {}
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # first: kernel modules are built interpreted or not at import
        interpreted = {name: kernel_sites(build) for name, build in FAMILIES.items()}
        del os.environ["TRITON_INTERPRET"]
    rows = [family_row(name, build, args.device, args.reps) for name, build in FAMILIES.items()]
    for row in rows:
        row["kernel_levers"], row["kernel_rel_error"] = interpreted.get(row["family"], (None, None))
    print("| family | levers here (fp32) | eager ms | torch.compile ms | wam_fast.compile ms | vs eager | "
          "vs torch.compile | rel. error | kernel sites (GPU; interpreted here) | their rel. error | FP8 levers | "
          "FP8 rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kernel_error = "-" if r["kernel_rel_error"] is None else f"{r['kernel_rel_error']:.1e}"
        print(f"| {r['family']} | {r['levers']} | {r['ms']['eager']:.2f} | {r['ms']['torch.compile']:.2f} | "
              f"{r['ms']['wam_fast.compile']:.2f} | {r['speedup_vs_eager']:.2f}x | {r['speedup_vs_torch_compile']:.2f}x | "
              f"{r['rel_error']:.1e} | {r['kernel_levers'] or '-'} | {kernel_error} | {r['fp8_levers']} | "
              f"{r['fp8_rel_error']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
