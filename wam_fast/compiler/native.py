"""The handlers for wam_fast's own models: ``WAMTransformer`` (fused block pieces, FP8 backbone linears,
torch.compile) and ``WAMPolicy`` (its model as above, the KV cache, and on CUDA one graph over the
sampling loop)."""
from __future__ import annotations

import torch.nn as nn

from wam_fast import ops
from wam_fast.cache import TemporalKVCache, not_cacheable_message
from wam_fast.compiler import graphs as policy_graphs
from wam_fast.compiler import session as session_module  # attention_fn looked up per call (tests swap it)
from wam_fast.compiler.config import CompileConfig
from wam_fast.compiler.report import REPORT_ATTR, CompileReport, attach_report
from wam_fast.compiler.session import Session, check_backend_available, compile_kwargs, describe_swap, module_device
from wam_fast.models import fused
from wam_fast.policy import WAMPolicy
from wam_fast.quant import default_filter
from wam_fast.utils.modules import retype, set_submodule


def _wam_fp8_reason(name: str) -> str:
    head = name.split(".")[0]
    if name.endswith(".adaln"):
        return ("AdaLN projection (B x segments rows: FP8 buys no time; its error would bias whole segments); "
                "opt in with wam_fast.quantize_fp8(filter_fn=...)")
    if head in ("text_proj", "action_embed", "time_embed", "step_embed", "patch_embed"):
        return "embedding (negligible FLOPs; raw inputs with outlier channels)"
    if head in ("video_proj", "action_proj", "video_out_norm", "action_out_norm"):
        return "output head / its AdaLN (writes the prediction itself; too few outputs for a GEMM worth speeding up)"
    return "outside wam_fast.quant.default_filter"


class ExternalAttention(fused.FusedAttention):
    """FusedAttention whose full-mask attention calls run an optional kernel (flash-attn /
    xformers); segment-masked calls (temporal mask, KV cache) run wam_fast.ops.attention."""

    _wam_fast_attention = "auto"

    def forward(self, x, ctx):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = ops.qk_norm_rope(q, k, self.norm_q.weight, self.norm_q.bias, self.norm_k.weight, self.norm_k.bias,
                                ctx.rope_cos, ctx.rope_sin, ctx.rope_start, ctx.rope_end, self.norm_q.eps)
        full = session_module.attention_fn(self._wam_fast_attention)

        def attend(q, k, v, q_segments, k_segments, mask):
            return full(q, k, v) if mask == "full" else ops.attention(q, k, v, q_segments, k_segments, mask)

        o = ctx.attend(q, k, v, attend)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


def compile_wam_transformer(model, config: CompileConfig, filter_fn, report: CompileReport, example_inputs,
                             graphs: str = "module"):
    """WAMTransformer: fuse, FP8 (default filter), torch.compile of forward; cache is WAMPolicy's."""
    device = module_device(model)
    check_backend_available(config, device)
    compile_kwargs(config, device, graphs)
    session = Session(model, config, filter_fn, report, example_inputs)
    if config.fused:
        def swap():
            fused.fuse(model, filter_fn)
            if config.attention != "auto":
                cls = ExternalAttention
                for name, module in list(model.named_modules()):
                    if type(module) is fused.FusedAttention:
                        new = retype(module, cls)
                        new._wam_fast_attention = config.attention
                        set_submodule(model, name, new)

        session.swap_lever("fused", "rel", swap, describe_swap)
        for name, module in model.named_modules():
            if type(module) in fused.FUSED and not session.accepts(module, name):
                report.skip(name, f"{type(module).__name__} not fused: excluded by filter_fn")
    else:
        report.skip("fused", "fused=False: the reference block pieces run (plain PyTorch)")

    wanted = default_filter(model)
    session.fp8(lambda module, name: None if type(module) is nn.Linear and wanted(module, name)
                else _wam_fp8_reason(name))
    if graphs == "module" and config.cache:
        report.skip("cache", "applies to WAMPolicy: compile wam_fast.WAMPolicy(model, cache=True) (a mask='temporal' "
                             "model) to reuse text and frame K/V")
    session.torch_compile(graphs)


# ---- WAMPolicy ---------------------------------------------------------------------------------------
def compile_policy(policy, config: CompileConfig, filter_fn, report: CompileReport, example_inputs):
    """WAMPolicy: its model as a WAMTransformer, the KV cache, and (CUDA) the sampling loop's graph."""
    model, device = policy.model, policy.device
    check_backend_available(config, device)
    # everything that can refuse is checked before anything changes
    wants_cache = config.cache and policy.config.mask == "temporal"
    if (policy.cache is not None) != wants_cache and policy.text is not None:
        raise ValueError("compile the WAMPolicy before reset(text): CompileConfig(cache=...) changes its KV cache, "
                         "which reset() fills")
    loop_graph = device.type == "cuda" and config.cuda_graphs is not False and wants_cache
    if config.cuda_graphs and not wants_cache:
        raise ValueError("cuda_graphs=True: the WAMPolicy's chunk graph needs the KV cache (cache=True and a "
                         "mask='temporal' model): uncached, the window of past frames grows over the first steps "
                         "and is held on the host. Use cuda_graphs=None")
    if config.cuda_graphs and not _runs_its_chunk(policy):
        raise ValueError(f"cuda_graphs=True: {type(policy).__name__} overrides WAMPolicy's act() or run_chunk(), "
                         f"which the chunk graph would bypass")
    # the cached loop graph holds the model's pieces; the uncached forward may get torch.compile's graphs
    model_graphs = "policy" if loop_graph else "module"
    if getattr(model, REPORT_ATTR, None) is None:
        compile_kwargs(config, device, model_graphs)  # conflicts raise before any change

    if getattr(model, REPORT_ATTR, None) is not None:
        report.apply("model", "already compiled (wam_fast.compile_report(policy.model))")
    else:
        sub = CompileReport(target=type(model).__name__, config=config)
        compile_wam_transformer(model, config, filter_fn, sub, example_inputs, graphs=model_graphs)
        attach_report(model, sub, bound=True)

        def where(w):
            return f"model {w}" if w in ("torch.compile", "fused", "fp8", "accuracy check") else f"model.{w}"

        report.applied += [(where(w), t) for w, t in sub.applied]
        report.skipped += [(where(w), t) for w, t in sub.skipped if w not in ("cache", "cuda_graphs")]
        report.checks += [dict(c, lever=f"model {c['lever']}") for c in sub.checks]

    if config.cache:
        if policy.cache is not None:
            report.apply("cache", "TemporalKVCache: text K/V once per episode, frame K/V once per control step, "
                                  "only the noisy tokens at each denoising step")
        elif not wants_cache:
            report.skip("cache", not_cacheable_message(policy.config))
        else:
            policy.cache = TemporalKVCache(model)
            report.apply("cache", "TemporalKVCache turned on (the policy was built with cache=False)")
    elif policy.cache is not None:
        policy.cache = None
        report.apply("cache", "turned off (CompileConfig.cache=False): every step runs the whole sequence")
    else:
        report.skip("cache", "cache=False")

    if policy.cache is not None and config.backend != "eager":
        # be exact about reach: the cached passes call the blocks directly, not model.forward
        report.skip("cached steps: torch.compile", "the KV cache runs the blocks outside model.forward, so "
                    "torch.compile of forward does not reach the cached frame pass and denoising steps (they run "
                    "as fused ops; on CUDA the chunk graph holds them)")
    if device.type != "cuda":
        report.skip("cuda_graphs", f"no CUDA device (the policy runs on {device}): the sampling loop runs eagerly")
    elif config.cuda_graphs is False:
        report.skip("cuda_graphs", "cuda_graphs=False")
    elif policy.cache is None:
        report.skip("cuda_graphs", "uncached policy: its window of past frames grows over the first steps and is held "
                                   "on the host, so no one graph fits every act() (the model's torch.compile may use "
                                   "its own CUDA graphs)")
    elif not _runs_its_chunk(policy):
        report.skip("cuda_graphs", f"{type(policy).__name__} overrides WAMPolicy's act() or run_chunk(): left as is")
    else:
        runner = policy_graphs.attach(policy, policy_graphs.CudaGraphCapture)
        report.apply("cuda_graphs", runner.describe())


def _runs_its_chunk(policy) -> bool:
    """Whether ``policy.act`` calls WAMPolicy's own chunk (a subclass may override either)."""
    cls = type(policy)
    return cls.act is WAMPolicy.act and cls.run_chunk is WAMPolicy.run_chunk
