"""The decoder forward pass of a packed step, on the model's own weights.

The library's forward for a Llama-shaped model issues about 60 small tensor
operations per layer, several of them for a rotary embedding that sinkserve
makes the identity (it rotates inside the cache instead). On a CPU a decode
step of one session reads 0.5 GB of weights in about 15 ms, and those small
operations cost almost as much again. This module runs the same
computation in about 20 operations per layer:

- q, k and v are one matrix product, and so are the MLP's gate and up;
- on the CPU those products run oneDNN's linear on weights packed once into
  its blocked layout, which streams them faster than the plain kernels;
- no rotary embedding runs here: attention (worker.attention) rotates q and
  k to their in-cache positions, exactly as it does under the library's
  forward with every position at zero.

The library's modules stay in place and keep working: each projection
becomes a view of its part of the fused product, so the library's forward
still computes the same function (tests compare the two), while the weights
are stored once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from worker.attention import PackedStep, sink_attention

PACK_BATCH_HINT = 64  # the row count oneDNN lays packed weights out for


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this build of torch, on this CPU, can pack a weight for oneDNN.

    bf16 packing needs bf16 support in the CPU's instruction set (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT); an AVX2-only CPU packs fp32 only.
    """
    if not (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    return weight.dtype == torch.float32 or cpu_has_bf16()


def cpu_has_bf16() -> bool:
    """Whether oneDNN finds bf16 instructions on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class FusedLinear(nn.Module):
    """Linear layers that read the same input, run as one matrix product.

    The output is the layers' outputs side by side, in the order given.
    On the CPU the weight is packed for oneDNN; elsewhere it is a plain
    tensor. Either way it is held outside the module's parameters: it is
    not saved, moved or cast with the model.
    """

    def __init__(self, linears: list[nn.Linear], pack: bool | None = None):
        super().__init__()
        weights = [lin.weight.detach() for lin in linears]
        # One layer's weight is used as it is: a tied output head stays tied
        # where nothing is packed.
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        weight = weight.contiguous()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.splits = [lin.out_features for lin in linears]
        self.dtype = weight.dtype
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat(
                [
                    lin.bias.detach()
                    if lin.bias is not None
                    else weight.new_zeros(lin.out_features)
                    for lin in linears
                ]
            )
        self.packed = can_pack(weight) if pack is None else pack
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(
                weight, PACK_BATCH_HINT
            )
        else:
            self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]."""
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.dtype:
            raise TypeError(f"input is {x.dtype}, the packed weight is {self.dtype}")
        return torch.ops.mkldnn._linear_pointwise(
            x, self.weight, self.bias, "none", [], ""
        )

    def nbytes(self) -> int:
        tensors = [self.weight] if self.bias is None else [self.weight, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors)


class FusedPart(nn.Module):
    """One of the layers inside a `FusedLinear`, for the library's forward.

    It runs the whole fused product and keeps its own columns, so the
    library's modules compute what they always did, at the cost of the
    sibling layers' work; the worker's own forward never calls it.
    """

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self.fused = [fused]  # a list: not a submodule, nothing registered twice
        self.start = sum(fused.splits[:index])
        self.out_features = fused.splits[index]
        self.in_features = fused.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0](x)[..., self.start : self.start + self.out_features]


class RMSNorm:
    """The library's RMS norm: in fp32, rounded to the input's dtype before
    the weight is applied."""

    def __init__(self, module: nn.Module):
        self.weight = module.weight.detach()
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        self.eps = float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 * scale).to(x.dtype)


class _LayerIndex:
    """What the attention function reads of a module: its layer index."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx


class DecoderLayer:
    """One decoder layer: attention over the sink caches, then the MLP."""

    def __init__(self, layer: nn.Module, config: object, head_dim: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.index = _LayerIndex(attn.layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scaling = attn.scaling
        self.input_norm = RMSNorm(layer.input_layernorm)
        self.post_norm = RMSNorm(layer.post_attention_layernorm)
        self.q_norm = RMSNorm(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = RMSNorm(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = FusedLinear([attn.o_proj])
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.down = FusedLinear([mlp.down_proj])
        self.act = mlp.act_fn
        self.intermediate = mlp.gate_proj.out_features
        for module, name, fused, index in (
            (attn, "q_proj", self.qkv, 0),
            (attn, "k_proj", self.qkv, 1),
            (attn, "v_proj", self.qkv, 2),
            (attn, "o_proj", self.o_proj, 0),
            (mlp, "gate_proj", self.gate_up, 0),
            (mlp, "up_proj", self.gate_up, 1),
            (mlp, "down_proj", self.down, 0),
        ):
            setattr(module, name, FusedPart(fused, index))

    def __call__(
        self, hidden: torch.Tensor, step: PackedStep, q_scale: float
    ) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]."""
        num_tokens = hidden.shape[0]
        qkv = self.qkv(self.input_norm(hidden))  # [T, (H + 2 KVH) * D]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if q_scale != 1.0:
            q, k = q * q_scale, k * q_scale
        attended, _ = sink_attention(
            self.index,
            q.transpose(0, 1)[None],  # [1, H, T, D]
            k.transpose(0, 1)[None],  # [1, KVH, T, D]
            v.transpose(0, 1)[None],
            None,
            scaling=self.scaling,
            packed_step=step,
        )  # [1, T, H, D]
        hidden = hidden + self.o_proj(attended.reshape(num_tokens, q_size))

        gate, up = self.gate_up(self.post_norm(hidden)).split(self.intermediate, -1)
        return hidden + self.down(self.act(gate) * up)


class Decoder:
    """The whole model on a packed step: embeddings, layers, norm, head."""

    def __init__(self, model: PreTrainedModel, head_dim: int, attention_scaling: float):
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = [DecoderLayer(layer, config, head_dim) for layer in inner.layers]
        self.norm = RMSNorm(inner.norm)
        self.lm_head = FusedLinear([model.lm_head])
        model.lm_head = FusedPart(self.lm_head, 0)
        # The library's forward with every position at zero scales q and k
        # by the rope's attention factor (cos(0) times it); so does this one.
        self.q_scale = attention_scaling

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        step: PackedStep,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """input_ids [T] -> logits [N, V] for the rows in `keep` (all if None)."""
        hidden = self.embed(input_ids)  # [T, hidden_size]
        for layer in self.layers:
            hidden = layer(hidden, step, self.q_scale)
        if keep is not None:
            hidden = hidden.index_select(0, keep)
        return self.lm_head(self.norm(hidden))

    def nbytes(self) -> int:
        """Bytes of weights one step reads: every matrix and norm once; the
        embedding is read one row a token, so it is left out."""
        norms = [self.norm]
        total = self.lm_head.nbytes()
        for layer in self.layers:
            for fused in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                total += fused.nbytes()
            norms += [layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm]
        for norm in norms:
            if norm is not None:
                total += norm.weight.numel() * norm.weight.element_size()
        return total


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def supports(model: PreTrainedModel) -> bool:
    """Whether every layer has the Llama shape this decoder runs."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return False
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, name, None) for name in ATTENTION_PROJECTIONS]
        projections += [getattr(mlp, name, None) for name in MLP_PROJECTIONS]
        if not all(isinstance(p, nn.Linear) for p in projections):
            return False
        if not hasattr(mlp, "act_fn") or not hasattr(layer, "post_attention_layernorm"):
            return False
    return True
