"""Hugging Face ``KLAConfig`` / ``KLAForCausalLM``: the kla-megatron network in plain PyTorch.

This file and ``kla_core.py`` (the layer's math in plain PyTorch: constants, discretisation,
sensors, the filter step, the causal conv) are copied into every exported directory (with
``auto_map`` in config.json) so that ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works on a machine without our package. They import only torch and
transformers. In the package, ``.kla_core`` is ``kla_megatron/ops/kla_core.py`` (aliased by
``kla_megatron/hf/__init__.py``): one source for both. When ``kla_megatron`` is importable, the
KLA filter runs through its ``kla_scan`` / ``kla_decode_step`` kernels (Triton on GPU);
otherwise through the sequential filter of ``kla_core`` (same math, docs/kla.md#filter).

The network (same as ``kla_megatron.models.KLAModel`` at TP = PP = 1): embedding → one layer
per ``layer_pattern`` symbol (``K`` KLA mixer, ``*`` causal self-attention with RoPE/GQA, ``-``
MLP), each ``x + f(norm(x))`` → final norm → output layer (or the tied embedding).

Parameter names (``model.layers.<i>.`` prefix; shapes as in the megatron model):
  K: ``norm.weight``, ``mixer.{in_proj.weight, conv_weight, conv_bias, sensor_weight,
     var_expand (mamba), A_log, delta_raw, p, lambda_skip, out_proj.weight}``
  *: ``norm.weight``, ``attn.qkv_proj.weight`` (megatron's grouped layout: for each query
     group [its query heads | k | v]), ``attn.o_proj.weight``
  -: ``norm.weight``, ``mlp.fc1.weight`` ([gate | up] for SwiGLU), ``mlp.fc2.weight``
  ``model.embed_tokens.weight``, ``model.norm_f.weight``, ``lm_head.weight`` (absent when tied).
LayerNorm models also have ``.bias`` on every norm.

Decoding: ``KLACache`` holds each KLA layer's conv window and filter state (O(1) per token)
and each attention layer's keys/values (``reorder_cache`` for beam search). Padding (``attention_mask``
0, any side, as generate's left padding) is exact: a padded position leaves the KLA conv window and
filter state as they were and is masked in attention; RoPE positions count real tokens only.
``output_variance=True`` also returns, per KLA layer, the mixer's output variance
``out_proj.weight² · y_var`` [b, s, D] (the paper's uncertainty).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import generic as _generic

from .kla_core import (LAMBDA_SKIP_INIT, P_INIT, default_state, dynamics, filter_scan, filter_step,
                       initial_delta_raw, state_dtype, torch_causal_conv1d, torch_sensor_activations)

try:  # our kernels when the package is installed; the exported file must not need them
    from kla_megatron.ops.kla import kla_decode_step as _pkg_decode_step
    from kla_megatron.ops.kla import kla_scan as _pkg_scan
except ImportError:
    _pkg_scan = _pkg_decode_step = None

_CACHE_FIELD = "cache" if hasattr(_generic, "_rename_kwargs_for_bc") else "past_key_values"
LAYER_SYMBOLS = "K*-"


class KLAConfig(PretrainedConfig):
    """Architecture of a KLA / hybrid model (the fields of ``KLAModelConfig``)."""

    model_type = "kla"
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_seq_len"}

    def __init__(self, vocab_size=256, hidden_size=64, num_layers=2, layer_pattern=None, kla_heads=1, d_state=16,
                 expand=2.0, conv_kernel=4, preset="plain", kla_var_rank=None, num_attention_heads=8,
                 num_query_groups=None, ffn_hidden_size=None, swiglu=True, normalization="RMSNorm", norm_eps=1e-5,
                 tie_embeddings=False, position_embedding="none", rotary_base=10000, max_seq_len=2048,
                 scan_backend="auto", initializer_range=0.02, **kwargs):
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.layer_pattern = layer_pattern if layer_pattern is not None else ("K-" * num_layers)[:num_layers]
        self.kla_heads, self.d_state, self.expand, self.conv_kernel = kla_heads, d_state, expand, conv_kernel
        self.preset, self.kla_var_rank = preset, kla_var_rank
        self.num_attention_heads, self.num_query_groups = num_attention_heads, num_query_groups
        if ffn_hidden_size is None:
            ffn_hidden_size = 64 * math.ceil(8 * hidden_size / 3 / 64) if swiglu else 4 * hidden_size
        self.ffn_hidden_size, self.swiglu = ffn_hidden_size, swiglu
        self.normalization, self.norm_eps = normalization, norm_eps
        self.tie_embeddings = tie_embeddings  # we tie ourselves (no lm_head module): HF's tying stays off
        self.position_embedding, self.rotary_base, self.max_seq_len = position_embedding, rotary_base, max_seq_len
        self.scan_backend, self.initializer_range = scan_backend, initializer_range
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """ValueError naming the first inconsistent field."""
        bad = sorted({c for c in self.layer_pattern if c not in LAYER_SYMBOLS})
        if bad:
            raise ValueError(f"KLAConfig.layer_pattern {self.layer_pattern!r} has unknown symbols {bad} (use K, *, -)")
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(f"KLAConfig: layer_pattern has {len(self.layer_pattern)} symbols, num_layers={self.num_layers}")
        if self.preset not in ("plain", "mamba"):
            raise ValueError(f"KLAConfig.preset must be 'plain' or 'mamba', got {self.preset!r}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"KLAConfig.normalization must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}")
        if self.position_embedding not in ("none", "rope"):
            raise ValueError(f"KLAConfig.position_embedding must be 'none' or 'rope', got {self.position_embedding!r}")
        if self.d_inner % self.kla_heads:
            raise ValueError(f"KLAConfig: d_inner {self.d_inner} is not divisible by kla_heads {self.kla_heads}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"KLAConfig: hidden_size {self.hidden_size} not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.query_groups:
            raise ValueError(f"KLAConfig: num_attention_heads {self.num_attention_heads} not divisible by "
                             f"num_query_groups {self.query_groups}")
        if self.preset == "mamba" and self.var_rank % self.kla_heads:
            raise ValueError(f"KLAConfig: kla_var_rank {self.var_rank} not divisible by kla_heads {self.kla_heads}")

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    @property
    def var_rank(self) -> int:
        return self.kla_var_rank if self.kla_var_rank is not None else math.ceil(self.hidden_size / 8)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


# ---------------------------------------------------------------------- the filter


def run_filter(v, lambda_v, k, q, a, p, state, backend):
    """Dispatch: our package's kernels when importable (and not ``backend="builtin"``)."""
    use_pkg = _pkg_scan is not None and backend != "builtin"
    if v.shape[1] == 1:
        if use_pkg:
            y, y_var, state = _pkg_decode_step(v[:, 0], lambda_v[:, 0], k[:, 0], q[:, 0], a, p, state,
                                               backend=backend)
            return y[:, None], y_var[:, None], state
        y, y_var, lam, eta = filter_step(v[:, 0], lambda_v[:, 0], k[:, 0], q[:, 0], a, p, *state)
        return y[:, None], y_var[:, None], (lam, eta)
    if use_pkg:
        return _pkg_scan(v, lambda_v, k, q, a, p, initial_state=state, output_final_state=True, backend=backend,
                         check_values=False)
    y, y_var, lam, eta = filter_scan(v, lambda_v, k, q, a, p, *state)
    return y, y_var, (lam, eta)


def run_filter_lengths(v, lambda_v, k, q, a, p, state, backend, lengths=None):
    """``run_filter`` where row b consumes only its first ``lengths[b]`` tokens (the rest are
    padding: identity transition, no observation, output 0). Rows of equal length run together,
    so every row sees exactly the sequence it would see alone (same kernels, same length)."""
    if lengths is None:
        return run_filter(v, lambda_v, k, q, a, p, state, backend)
    y, y_var = v.new_zeros(v.shape), v.new_zeros(v.shape)
    lam, eta = (t.clone() for t in state)
    for length in sorted(set(lengths.tolist())):
        if length == 0:
            continue  # an all-padding row keeps its state
        rows = (lengths == length).nonzero()[:, 0]
        yr, yvr, (lr, er) = run_filter(v[rows, :length], lambda_v[rows, :length], k[rows, :length],
                                       q[rows, :length], a, p, (lam[rows], eta[rows]), backend)
        y[rows, :length], y_var[rows, :length] = yr.to(y.dtype), yvr.to(y.dtype)
        lam[rows], eta[rows] = lr.to(lam.dtype), er.to(eta.dtype)
    return y, y_var, (lam, eta)


# ---------------------------------------------------------------------- cache


class KLACache:
    """Decoding state: per layer index, KLA ``(conv window, (lam, eta))`` or attention ``(k, v)``.
    ``seen`` counts the positions already consumed, padding included (input slicing; it is the
    attention k/v length). ``mask`` [b, seen] marks the real ones (None: all real); it masks the
    cached keys and gives RoPE positions. ``embeds_only`` counts prompt positions that came as
    ``inputs_embeds`` without ids (generate keeps only the generated ids then)."""

    is_compileable = False

    def __init__(self):
        self.layers: Dict[int, tuple] = {}
        self.seen = 0
        self.mask: Optional[torch.Tensor] = None
        self.embeds_only = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i of every state becomes row ``beam_idx[i]``."""
        def pick(t):
            return tuple(pick(u) for u in t) if isinstance(t, tuple) else t.index_select(0, beam_idx.to(t.device))

        self.layers = {i: pick(c) for i, c in self.layers.items()}
        if self.mask is not None:
            self.mask = pick(self.mask)


@dataclass
class _KLAOutputV5(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    cache: Optional[KLACache] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    variances: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class _KLAOutputV4(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional[KLACache] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    variances: Optional[Tuple[torch.FloatTensor, ...]] = None


# transformers >= 5 calls the cache `cache` (and renames a `past_key_values` field into it), 4.x
# calls it `past_key_values`: declare only the one this transformers knows.
KLACausalLMOutput = _KLAOutputV5 if _CACHE_FIELD == "cache" else _KLAOutputV4


# ---------------------------------------------------------------------- modules


class KLANorm(nn.Module):
    def __init__(self, config: KLAConfig):
        super().__init__()
        self.rms, self.eps = config.normalization == "RMSNorm", config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x):
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        if self.rms:
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight.to(h.dtype)
        else:
            h = F.layer_norm(h, h.shape[-1:], self.weight.to(h.dtype), self.bias.to(h.dtype), self.eps)
        return h.to(dtype)


class KLAMixer(nn.Module):
    """The multi-head KLA mixer (docs/kla.md#layer); H = 1 is the paper's layer."""

    def __init__(self, config: KLAConfig):
        super().__init__()
        D, M, H, S, K = config.hidden_size, config.d_inner, config.kla_heads, config.d_state, config.conv_kernel
        self.H, self.P, self.S, self.K, self.M = H, M // H, S, K, M
        self.preset, self.backend = config.preset, config.scan_backend
        self.w_v, self.w_var = (self.P, self.P) if config.preset == "plain" else (0, config.var_rank // H)
        self.in_proj = nn.Linear(D, 2 * M, bias=False)
        self.out_proj = nn.Linear(M, D, bias=False)
        bound = 1.0 / math.sqrt(K)
        self.conv_weight = nn.Parameter(torch.empty(M, 1, K).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.zeros(M))
        self.sensor_weight = nn.Parameter(torch.randn(H, self.w_v + self.w_var + 2 * S, self.P) * 0.02)
        self.var_expand = nn.Parameter(torch.randn(H, self.P, self.w_var) * 0.02) if self.preset == "mamba" else None
        # KLAMixerConfig's default initial values (the HF config has no init fields); loaded weights replace them.
        self.delta_raw = nn.Parameter(initial_delta_raw((H, self.P, S)).float())
        self.A_log = nn.Parameter(torch.zeros(H, self.P, S))
        self.p = nn.Parameter(torch.full((H, self.P, S), P_INIT))
        self.lambda_skip = nn.Parameter(torch.tensor(LAMBDA_SKIP_INIT))

    def _sensors(self, z):
        b, s, _ = z.shape
        zh = z.view(b, s, self.H, self.P)
        out = torch.einsum("bshp,hop->bsho", zh, self.sensor_weight.to(z.dtype))
        v, log_var, k, q = torch.split(out, [self.w_v, self.w_var, self.S, self.S], dim=-1)
        if self.preset == "mamba":
            v = zh
            log_var = torch.einsum("bshr,hpr->bshp", log_var, self.var_expand.to(z.dtype))
        return torch_sensor_activations(v, log_var, k, q, dtype=state_dtype(z))

    def forward(self, x, layer_cache=None, want_variance=False, mask=None):
        """x [b, s, D] → out [b, s, D], out_var or None, new layer cache. ``mask`` [b, s] (True = real
        token): padded positions leave the conv window and the filter state as they were."""
        lengths = None
        if mask is not None:
            # Move each row's real tokens to the front (in order): the conv and the filter then see
            # exactly the unpadded sequence; they stop after `lengths` tokens; outputs go back below.
            order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices
            lengths = mask.sum(1)
            x = x.gather(1, order[..., None].expand_as(x))
        z, gate = self.in_proj(x).split(self.M, dim=-1)
        b, s, _ = z.shape
        window, state = layer_cache if layer_cache is not None else (None, None)
        z, window = torch_causal_conv1d(z, self.conv_weight, self.conv_bias, window=window, activation="silu",
                                        lengths=lengths)
        v, lambda_v, k, q = self._sensors(z)
        a, p = dynamics(self.A_log, self.delta_raw, self.p)
        if state is None:
            state = default_state((b, self.H, self.P, self.S), dtype=a.dtype, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, y_var, state = run_filter_lengths(v, lambda_v, k, q, a, p, state, self.backend, lengths)
        y = y.reshape(b, s, self.M).to(z.dtype) + self.lambda_skip.to(z.dtype) * z
        g = F.silu(gate)
        out = self.out_proj(y * g)
        out_var = None
        if want_variance:
            y_var = y_var.reshape(b, s, self.M).to(z.dtype) * g.square()
            out_var = F.linear(y_var, self.out_proj.weight.square())
        if mask is not None:  # back to the padded layout; a pad gets its last real token's output (finite, unused)
            rank = (mask.cumsum(1) - 1).clamp_min(0)[..., None]
            out = out.gather(1, rank.expand_as(out))
            out_var = None if out_var is None else out_var.gather(1, rank.expand_as(out_var))
        return out, out_var, (window.detach(), tuple(t.detach() for t in state))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KLAAttention(nn.Module):
    """Causal self-attention with megatron's fused grouped QKV layout, RoPE and GQA."""

    def __init__(self, config: KLAConfig):
        super().__init__()
        self.nh, self.ng = config.num_attention_heads, config.query_groups
        self.hd = config.hidden_size // self.nh
        self.rope, self.base = config.position_embedding == "rope", config.rotary_base
        self.qkv_proj = nn.Linear(config.hidden_size, (self.nh + 2 * self.ng) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, config.hidden_size, bias=False)

    def _apply_rope(self, x, positions):
        """x [b, s, h, hd] rotated by ``positions`` [b or 1, s]."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.hd, 2, dtype=torch.float32, device=x.device) / self.hd))
        freqs = positions.to(device=x.device, dtype=torch.float32)[..., None] * inv_freq
        emb = torch.cat([freqs] * 2, dim=-1)[:, :, None, :]
        return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)

    def forward(self, x, layer_cache=None, positions=None, key_mask=None):
        """``positions`` [b or 1, s] (RoPE); ``key_mask`` [b, total] (True = real key) or None."""
        b, s, _ = x.shape
        per = self.nh // self.ng
        qkv = self.qkv_proj(x).view(b, s, self.ng, (per + 2) * self.hd)
        q, k, v = qkv.split([per * self.hd, self.hd, self.hd], dim=-1)
        q = q.reshape(b, s, self.nh, self.hd)
        if self.rope:
            q, k = self._apply_rope(q, positions), self._apply_rope(k, positions)
        if layer_cache is not None:
            k, v = torch.cat([layer_cache[0], k], 1), torch.cat([layer_cache[1], v], 1)
        total = k.shape[1]
        kr = k.repeat_interleave(per, dim=2)  # [b, total, nh, hd]
        vr = v.repeat_interleave(per, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(self.hd)
        allowed = torch.arange(total, device=x.device)[None, :] <= torch.arange(total - s, total, device=x.device)[:, None]
        allowed = allowed[None, None]
        if key_mask is not None:
            # Padded keys are invisible. A padded query still sees itself: an all -inf row would be
            # NaN, and 0 · NaN values would then leak into real rows through the einsum below.
            cols = torch.arange(total, device=x.device)
            own = cols[None, :] == cols[total - s :, None]
            allowed = allowed & (key_mask[:, None, None, :].to(x.device) | own)
        scores = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", scores, vr).reshape(b, s, self.nh * self.hd)
        return self.o_proj(out), (k.detach(), v.detach())


class KLAMLP(nn.Module):
    def __init__(self, config: KLAConfig):
        super().__init__()
        F_ = config.ffn_hidden_size
        self.swiglu = config.swiglu
        self.fc1 = nn.Linear(config.hidden_size, 2 * F_ if self.swiglu else F_, bias=False)
        self.fc2 = nn.Linear(F_, config.hidden_size, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


class KLABlock(nn.Module):
    """One pattern symbol: ``x + f(norm(x))``."""

    def __init__(self, config: KLAConfig, symbol: str):
        super().__init__()
        self.symbol = symbol
        self.norm = KLANorm(config)
        if symbol == "K":
            self.mixer = KLAMixer(config)
        elif symbol == "*":
            self.attn = KLAAttention(config)
        else:
            self.mlp = KLAMLP(config)

    def forward(self, x, layer_cache, positions, want_variance, mask=None, key_mask=None):
        h = self.norm(x)
        if self.symbol == "K":
            out, var, layer_cache = self.mixer(h, layer_cache, want_variance, mask)
            return x + out, var, layer_cache
        if self.symbol == "*":
            out, layer_cache = self.attn(h, layer_cache, positions, key_mask)
            return x + out, None, layer_cache
        return x + self.mlp(h), None, None


# ---------------------------------------------------------------------- models


class KLAPreTrainedModel(PreTrainedModel):
    config_class = KLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own KLACache, created by the forward

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, KLANorm):
            module.weight.data.fill_(1.0)
            if module.bias is not None:
                module.bias.data.zero_()


class KLAModel(KLAPreTrainedModel):
    def __init__(self, config: KLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([KLABlock(config, c) for c in config.layer_pattern])
        self.norm_f = KLANorm(config)
        self.gradient_checkpointing = False  # set by HF's gradient/activation_checkpointing_enable
        self.post_init()

    @staticmethod
    def _padding(attention_mask, cache, b, s, device):
        """(key mask [b, seen + s] or None when all real, RoPE positions [b or 1, s]). As transformers
        does for left padding, a token's position counts the real tokens before it."""
        seen = cache.seen if cache is not None else 0
        past = cache.mask if cache is not None else None
        if attention_mask is not None:
            am = attention_mask.to(device=device, dtype=torch.bool)
            if am.shape[1] == seen + s:  # generate's mask covers the past too
                full = am
            elif am.shape[1] == s:  # the mask of this chunk only
                full = am if seen == 0 else torch.cat([past if past is not None else am.new_ones(b, seen), am], 1)
            else:
                raise ValueError(f"KLAForCausalLM: attention_mask has {am.shape[1]} columns, expected {s} or "
                                 f"{seen + s} ({seen} cached + {s} new positions)")
        elif past is not None:
            full = torch.cat([past, past.new_ones(b, s)], 1)
        else:
            full = None
        if full is not None and bool(full.all()):
            full = None  # no padding: the plain path
        if full is None:
            return None, torch.arange(seen, seen + s, device=device)[None]
        return full, (full.cumsum(1) - 1)[:, -s:].masked_fill(~full[:, -s:], 1)

    def forward(self, input_ids=None, inputs_embeds=None, cache: Optional[KLACache] = None, want_variance=False,
                output_hidden_states=False, attention_mask=None, position_ids=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        key_mask, positions = self._padding(attention_mask, cache, b, s, x.device)
        if position_ids is not None:
            positions = position_ids
        chunk_mask = None if key_mask is None or bool(key_mask[:, -s:].all()) else key_mask[:, -s:]
        if cache is not None:
            cache.mask = key_mask
        variances, hidden = [], [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers.get(i) if cache is not None else None
            args = (x, layer_cache, positions, want_variance, chunk_mask, key_mask)
            if self.gradient_checkpointing and self.training:  # recompute the layer in backward
                x, var, layer_cache = self._gradient_checkpointing_func(layer.__call__, *args)
            else:
                x, var, layer_cache = layer(*args)
            if cache is not None and layer_cache is not None:
                cache.layers[i] = layer_cache
            if var is not None:
                variances.append(var)
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.seen += x.shape[1]
        return self.norm_f(x), tuple(variances), tuple(hidden) if hidden else None


class KLAForCausalLM(KLAPreTrainedModel, GenerationMixin):
    def __init__(self, config: KLAConfig):
        super().__init__(config)
        self.model = KLAModel(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, KLACache):
            cache = KLACache() if use_cache is not False else None
        if cache is not None and cache.seen > 0:
            # only the tokens the state has not consumed (ids do not cover an inputs_embeds prompt)
            input_ids = input_ids[:, cache.seen - cache.embeds_only :]
            inputs_embeds = None
        elif cache is not None and inputs_embeds is not None:
            cache.embeds_only = inputs_embeds.shape[1] - input_ids.shape[1]
        inputs = {"cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        return inputs

    def forward(self, input_ids=None, attention_mask=None, cache=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_variance=False, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, position_ids=None, **kwargs):
        """Logits [b, s, V] (fp32). ``attention_mask`` [b, s] or [b, cached + s] (0 = padding, any
        side): a padded position leaves every KLA state as it was and is masked in attention, so a
        padded row gives the logits of the row alone at its real positions (padded ones: unused).
        ``labels`` give the mean next-token cross entropy."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"KLAForCausalLM: attention_mask must be [batch, length], "
                             f"got {tuple(attention_mask.shape)}")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, KLACache):
            if cache.get_seq_length() != 0:
                raise ValueError(f"KLAForCausalLM needs a KLACache, got a non-empty {type(cache).__name__}")
            cache = None
        if cache is None and use_cache:
            cache = KLACache()
        hidden, variances, all_hidden = self.model(input_ids, inputs_embeds, cache, output_variance,
                                                   bool(output_hidden_states), attention_mask, position_ids)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.output_weight().to(hidden.dtype))
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        cache_field = {"cache": cache} if _CACHE_FIELD == "cache" else {"past_key_values": cache}
        return KLACausalLMOutput(loss=loss, logits=logits, hidden_states=all_hidden,
                                 variances=variances if output_variance else None, **cache_field)

    def _reorder_cache(self, cache, beam_idx):
        """Beam search: each kept beam continues from the state of the beam it extends."""
        if isinstance(cache, KLACache):
            cache.reorder_cache(beam_idx)
        return cache
