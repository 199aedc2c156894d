"""Gated DeltaNet linear attention (Qwen3.5's `linear_attn` layers) on the splitvl ops.

Same math as transformers' `Qwen3_5GatedDeltaNet`: fused q/k/v projection ->
depthwise causal conv + SiLU -> gated delta rule over l2-normalized q/k
(decay `g = -exp(A_log) * softplus(a + dt_bias)`, `beta = sigmoid(b)`) ->
RMSNorm gated by SiLU(z) -> output projection.

Per-sequence state lives in two pools owned by the engine, one pair per layer:
`conv_state [num_slots, conv_dim / tp, W - 1]` (model dtype) and
`recurrent_state [num_slots, Hv / tp, Dk, Dv]` (fp32); `AttentionMetadata`
says which slot each sequence uses and whether it continues it. Without pools
(full-sequence runs) every sequence starts from zeros in scratch pools.

All input projections run as one GEMM, `in_proj` with output columns
`[q | k | v | z | b | a]` (per rank: each part's own slice), filled from the
checkpoint's `in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a`
(`models.loader.PACKED_MODULES_MAPPING`): a small decode step is
launch-bound. The conv, the gated norm and the gating read their columns of
that output as strided views, without copies. A decode step runs everything
between the two projections as one op, `ops.gated_delta_net_decode`.

Tensor parallelism splits the key and value heads (each rank keeps whole
q/k/v head groups, so value head h still reads key head h // (Hv / Hk)).
"""

from __future__ import annotations

import torch
from torch import nn

import ops
from models.layers.attention import AttentionMetadata
from models.layers.linear import MergedColumnParallelLinear, RowParallelLinear, ShardSpec
from models.layers.parallel import SINGLE, ParallelContext, divide

StatePools = tuple[torch.Tensor, torch.Tensor]


class GatedDeltaNet(nn.Module):
    """Shapes: x [T, H] -> [T, H].

    Args:
        hidden_size: model width H.
        num_k_heads, num_v_heads, head_k_dim, head_v_dim: linear-attention heads.
        conv_kernel: causal conv width W.
        eps: epsilon of the gated RMSNorm.
    """

    def __init__(
        self,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_kernel: int,
        eps: float,
        parallel: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel or SINGLE
        tp = self.parallel.tp_size
        if num_v_heads % num_k_heads:
            raise ValueError(f"linear_num_value_heads {num_v_heads} must be a multiple of "
                             f"linear_num_key_heads {num_k_heads}")
        self.num_k_heads = divide(num_k_heads, tp)
        self.num_v_heads = divide(num_v_heads, tp)
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.conv_kernel = conv_kernel
        self.eps = eps
        key_dim, value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        self.part_sizes = [key_dim, key_dim, value_dim]  # q, k, v (whole model)
        self.key_dim = self.num_k_heads * head_k_dim  # per rank
        self.value_dim = self.num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim

        self.in_proj = MergedColumnParallelLinear(
            hidden_size, [*self.part_sizes, value_dim, num_v_heads, num_v_heads], parallel=self.parallel
        )
        self.out_proj = RowParallelLinear(value_dim, hidden_size, parallel=self.parallel)
        # Depthwise conv weight as the op reads it, [conv_dim / tp, W] (HF: [conv_dim, 1, W]).
        self.conv1d = nn.Module()
        self.conv1d.weight = self._param((self.conv_dim, conv_kernel), self._conv_spec, self._load_conv)
        # fp32 (exact copies of the checkpoint values): the decay math runs in fp32 as transformers'
        # does, and fp32 parameters save it a cast per layer and step.
        self.A_log = self._param((self.num_v_heads,), self._head_spec, self._load_heads, torch.float32)
        self.dt_bias = self._param((self.num_v_heads,), self._head_spec, self._load_heads, torch.float32)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(head_v_dim), requires_grad=False)

    # ---- weights -------------------------------------------------------------------

    @staticmethod
    def _param(shape: tuple[int, ...], spec, loader, dtype: torch.dtype | None = None) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        param.shard_spec = spec
        param.weight_loader = loader
        return param

    def _conv_spec(self, shard_id: None = None) -> ShardSpec:
        return ShardSpec((sum(self.part_sizes), 1, self.conv_kernel))

    def _load_conv(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        """Take this rank's rows of each of the q, k, v parts of the full conv weight."""
        self._conv_spec().take(loaded)
        rank, tp = self.parallel.tp_rank, self.parallel.tp_size
        parts = [p.narrow(0, rank * (p.shape[0] // tp), p.shape[0] // tp)
                 for p in loaded[:, 0].split(self.part_sizes, dim=0)]
        param.data.copy_(torch.cat(parts))

    def _head_spec(self, shard_id: None = None) -> ShardSpec:
        full = (self.num_v_heads * self.parallel.tp_size,)
        if self.parallel.tp_size == 1:
            return ShardSpec(full)
        return ShardSpec(full, 0, self.parallel.tp_rank * self.num_v_heads, self.num_v_heads)

    def _load_heads(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: None = None) -> None:
        param.data.copy_(self._head_spec().take(loaded))

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-slot shapes of (conv state, recurrent state) on this rank."""
        return (self.conv_dim, self.conv_kernel - 1), (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    # ---- forward -------------------------------------------------------------------

    def forward(self, x: torch.Tensor, attn: AttentionMetadata, pools: StatePools | None) -> torch.Tensor:
        """Shapes: x [T, H] -> [T, H]; `pools` None runs each sequence from a zero state."""
        # One fused op when every sequence decodes one token continuing its slot; decided from
        # host facts only (no device read), so the step can be captured in a CUDA graph.
        decode = pools is not None and attn.decode_only and attn.has_initial_state is None
        proj = self.in_proj(x)
        if decode:
            conv_state, recurrent = pools
            out = ops.gated_delta_net_decode(
                proj, self.conv1d.weight, conv_state, self.A_log, self.dt_bias, recurrent,
                self._slots(attn), self.norm.weight, self.eps, True,
            )
        else:
            out = self._prefill(proj, attn, pools)
        return self.out_proj(out.view(x.shape[0], self.value_dim))

    def _prefill(self, proj: torch.Tensor, attn: AttentionMetadata, pools: StatePools | None) -> torch.Tensor:
        """Packed sequences, each from its slot or from zeros. Shapes: proj [T, in_proj] -> [T, Hv, Dv]."""
        tokens = proj.shape[0]
        mixed, z, ba = proj.split([self.conv_dim, self.value_dim, 2 * self.num_v_heads], dim=-1)
        z = z.view(tokens, self.num_v_heads, self.head_v_dim)
        g, beta = ops.gdn_gating(ba, self.A_log, self.dt_bias)
        if pools is None:
            pools, slots, has_state = self._scratch(proj, attn), self._arange(attn), None
        else:
            slots, has_state = self._slots(attn), attn.has_initial_state
        conv_state, recurrent = pools
        mixed = ops.causal_conv1d_fwd(
            mixed, self.conv1d.weight, None, conv_state, attn.cu_seqlens_q, slots, has_state, True
        )
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.view(tokens, self.num_k_heads, self.head_k_dim)
        k = k.view(tokens, self.num_k_heads, self.head_k_dim)
        v = v.view(tokens, self.num_v_heads, self.head_v_dim)
        out = ops.gated_delta_rule_chunked(q, k, v, g, beta, attn.cu_seqlens_q, recurrent, slots, has_state, True)
        return ops.gated_rms_norm(out, z, self.norm.weight, self.eps)

    @staticmethod
    def _slots(attn: AttentionMetadata) -> torch.Tensor:
        if attn.state_indices is None:
            raise ValueError("a hybrid model run with state pools needs attn.state_indices")
        return attn.state_indices

    def _arange(self, attn: AttentionMetadata) -> torch.Tensor:
        batch = attn.cu_seqlens_q.shape[0] - 1
        return torch.arange(batch, dtype=torch.int32, device=attn.cu_seqlens_q.device)

    def _scratch(self, x: torch.Tensor, attn: AttentionMetadata) -> StatePools:
        """Zero pools with one slot per sequence (runs without engine state)."""
        batch = attn.cu_seqlens_q.shape[0] - 1
        conv_shape, rec_shape = self.state_shapes()
        return (
            torch.zeros((batch, *conv_shape), dtype=x.dtype, device=x.device),
            torch.zeros((batch, *rec_shape), dtype=torch.float32, device=x.device),
        )

    def extra_repr(self) -> str:
        return (f"k_heads={self.num_k_heads}, v_heads={self.num_v_heads}, head_k_dim={self.head_k_dim}, "
                f"head_v_dim={self.head_v_dim}, conv_kernel={self.conv_kernel}")
