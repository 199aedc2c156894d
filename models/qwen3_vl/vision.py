"""The Qwen3-VL vision tower (also Qwen3.5's, which has no deepstack) on splitvl ops.

Same math as transformers' `Qwen3VLVisionModel`: a patch embedding (the Conv3d
with kernel == stride is one matmul over the flattened patch), the learned
position table bilinearly resampled to each image's grid (align_corners), a 2-D
rotary over (row, col) in merge-block order, pre-norm blocks with bidirectional
attention per frame, the patch merger, and the deepstack mergers fed by the
blocks at `deepstack_visual_indexes`.

Everything that depends only on the grids (interpolation taps, rotary
positions, cu_seqlens) is computed by `VisionGridCache`, an LRU keyed by the
batch's grids, so a batch of already-seen image sizes costs no Python work.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ops
from models.config import ConfigError, VisionConfig
from models.layers.activation import GeluTanh
from models.layers.linear import ReplicatedLinear
from models.layers.rotary import RotaryEmbedding, vision_rotary_embedding
from models.loader import CheckpointError, CheckpointReader, load_module


# The tower's attention: "splitvl" (ops.varlen_attention) or torch's kernels: "sdpa"
# (scaled_dot_product_attention over equal-length frames as a batch, its own backend choice:
# cuDNN / flash / memory-efficient) or "flash" (torch's flash attention: SDPA's flash backend, or
# `varlen_attn` over packed frames of mixed lengths). Frames of mixed lengths without `varlen_attn`
# (CPU, older torch) take one SDPA call per frame. "auto", the default: "sdpa" on CUDA for a batch of
# equal frames of at least SDPA_MIN_FRAME patches (cuDNN's kernel runs a 4,096-patch frame 1.6-1.75x
# faster than ours on an H100, BENCHMARKS.md 14), "splitvl" otherwise (small frames: ours is faster,
# as it is on CPU). `SPLITVL_VIT_ATTN` sets the process default.
SDPA_MIN_FRAME = 2048
ATTENTION_BACKENDS = ("auto", "splitvl", "sdpa", "flash")


def _default_attention_backend() -> str:
    name = os.environ.get("SPLITVL_VIT_ATTN", "auto") or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"SPLITVL_VIT_ATTN={name!r}: expected one of {ATTENTION_BACKENDS}")
    return name


# Rotary table rows (grid side in patches) allocated up front; larger grids grow it.
ROTARY_MIN_POSITIONS = 1024
LAYER_NORM_EPS = 1e-6
_MLP_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")

Grid = tuple[int, int, int]


class VisionInputError(ValueError):
    """pixel_values / grid_thw do not describe a valid batch of images."""


@dataclass(frozen=True, slots=True)
class VisionGridMeta:
    """Grid-derived inputs of one batch, on the model's device.

    Shapes: pos_indices [N, 4] int64 (rows of the flattened position table);
    pos_weights [N, 4] fp32 (bilinear weights); rotary_positions [2, N] int64
    (row, col of each patch); cu_seqlens [S+1] int32, one segment per frame,
    frame_lengths (host ints) the S segments' lengths, and equal_frame their common length
    when all are equal, else 0 (what the attention layers choose their kernel by).
    Patches are in merge-block order, as the processor emits them.
    """

    pos_indices: torch.Tensor
    pos_weights: torch.Tensor
    rotary_positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    max_position: int
    frame_lengths: tuple[int, ...]
    equal_frame: int


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners) of `index` on an axis of `size` into `side` entries.

    Shapes: index [N] -> taps [N, 2] int64, weights [N, 2] fp32.
    """
    src = index.to(torch.float32) * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    frac = src - floor
    taps = torch.stack([floor, floor + 1], dim=-1).long().clamp_(0, side - 1)
    return taps, torch.stack([1 - frac, frac], dim=-1)


def frame_geometry(h: int, w: int, side: int, merge: int) -> tuple[torch.Tensor, ...]:
    """One frame's per-patch position-table taps and rotary positions (CPU).

    Patches are ordered (block_row, block_col, row_in_block, col_in_block).
    Returns: pos_indices [h*w, 4] int64, pos_weights [h*w, 4] fp32,
    rotary_positions [2, h*w] int64.
    """
    bh, bw = h // merge, w // merge
    inner = torch.arange(merge)
    rows = (torch.arange(bh).view(bh, 1, 1, 1) * merge + inner.view(1, 1, merge, 1))
    cols = (torch.arange(bw).view(1, bw, 1, 1) * merge + inner.view(1, 1, 1, merge))
    rows = rows.expand(bh, bw, merge, merge).flatten()
    cols = cols.expand(bh, bw, merge, merge).flatten()
    h_taps, h_weights = _axis_taps(rows, h, side)
    w_taps, w_weights = _axis_taps(cols, w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights, torch.stack([rows, cols])


class _LRU:
    """A small least-recently-used map."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()

    def get_or_make(self, key, make: Callable):
        value = self._data.get(key)
        if value is None:
            value = self._data[key] = make()
            if len(self._data) > self.capacity:
                self._data.popitem(last=False)
        else:
            self._data.move_to_end(key)
        return value


class VisionGridCache:
    """Grid-derived tensors, cached per frame size (CPU) and per batch (device)."""

    def __init__(self, side: int, merge: int, head_dim: int, device: torch.device, capacity: int = 64):
        self.side, self.merge, self.head_dim, self.device = side, merge, head_dim, device
        self._frames = _LRU(4 * capacity)
        self._batches = _LRU(capacity)
        self.rotary = vision_rotary_embedding(head_dim, ROTARY_MIN_POSITIONS).to(device)

    def get(self, grids: tuple[Grid, ...]) -> VisionGridMeta:
        """The batch's metadata; also grows `rotary` to cover its largest grid side."""
        meta = self._batches.get_or_make(grids, lambda: self._build(grids))
        if meta.max_position > self.rotary.max_position:
            size = 1 << (meta.max_position - 1).bit_length()
            self.rotary = vision_rotary_embedding(self.head_dim, size).to(self.device)
        return meta

    def _frame(self, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return self._frames.get_or_make((h, w), lambda: frame_geometry(h, w, self.side, self.merge))

    def _build(self, grids: tuple[Grid, ...]) -> VisionGridMeta:
        indices, weights, positions, seqlens = [], [], [], [0]
        for t, h, w in grids:
            frame = self._frame(h, w)
            indices += [frame[0]] * t
            weights += [frame[1]] * t
            positions += [frame[2]] * t
            seqlens += [h * w] * t
        cu = torch.tensor(seqlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        to = dict(device=self.device, non_blocking=True)
        return VisionGridMeta(
            pos_indices=torch.cat(indices).to(**to),
            pos_weights=torch.cat(weights).to(**to),
            rotary_positions=torch.cat(positions, dim=1).to(**to),
            cu_seqlens=cu.to(**to),
            max_seqlen=max(seqlens),
            max_position=max(max(h, w) for _, h, w in grids),
            frame_lengths=tuple(seqlens[1:]),
            equal_frame=seqlens[1] if len(set(seqlens[1:])) == 1 else 0,
        )


def _linear(in_features: int, out_features: int) -> nn.Module:
    """A replicated (no TP) linear layer with bias."""
    return ReplicatedLinear(in_features, out_features, bias=True)


class VisionLayerNorm(nn.Module):
    """LayerNorm with weight and bias (eps 1e-6, as every norm of the tower)."""

    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@functools.cache
def torch_varlen_attention() -> Callable | None:
    """torch's packed flash attention as `fn(q, k, v, cu_seqlens, max_seqlen, scale)` (bidirectional),
    or None where this torch has no `torch.nn.attention.varlen` (its first releases take no `scale`:
    there only the default 1/sqrt(head_dim) is served, other scales get None from `fn`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    takes_scale = "scale" in inspect.signature(varlen_attn).parameters

    def fn(q, k, v, cu_seqlens, max_seqlen, scale):
        if takes_scale:
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
        if abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            return None
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)

    return fn


def torch_frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VisionGridMeta,
                          scale: float, backend: str) -> torch.Tensor:
    """Bidirectional attention within each frame on torch's kernels (`backend` "sdpa" or "flash").

    Shapes: q, k, v [N, H, D] (last dim contiguous, any row stride) -> [N, H, D].
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, heads, dim = q.shape
    lengths = meta.frame_lengths
    pick = [SDPBackend.FLASH_ATTENTION] if backend == "flash" and q.is_cuda else None
    if meta.equal_frame:  # equal frames: one batched call
        q, k, v = (t.view(len(lengths), meta.equal_frame, heads, dim).transpose(1, 2) for t in (q, k, v))
        if pick is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            with sdpa_kernel(pick):
                out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(n, heads, dim)
    varlen = torch_varlen_attention() if q.is_cuda else None
    out = None if varlen is None else varlen(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
    if out is not None:
        return out
    out, row = torch.empty(q.shape, dtype=q.dtype, device=q.device), 0
    for length in lengths:
        span = slice(row, row + length)
        one = (t[span].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[span] = F.scaled_dot_product_attention(*one, scale=scale)[0].transpose(0, 1)
        row += length
    return out


class VisionAttention(nn.Module):
    """Fused-qkv bidirectional attention within each frame, with the 2-D rotary."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = _linear(hidden, 3 * hidden)
        self.proj = _linear(hidden, hidden)
        self.backend = _default_attention_backend()

    def forward(self, x: torch.Tensor, meta: VisionGridMeta, rotary: RotaryEmbedding) -> torch.Tensor:
        """Shapes: x [N, hidden] -> [N, hidden]."""
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # strided [N, H, D] views, rotated in place
        rotary(meta.rotary_positions, q, k)
        backend = self.backend
        if backend == "auto":
            backend = "sdpa" if q.is_cuda and meta.equal_frame >= SDPA_MIN_FRAME else "splitvl"
        if backend == "splitvl":
            out = ops.varlen_attention(
                q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                self.scale, False,
            )
        else:
            out = torch_frame_attention(q, k, v, meta, self.scale, backend)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.linear_fc1 = _linear(hidden, intermediate)
        self.linear_fc2 = _linear(intermediate, hidden)
        self.act = GeluTanh() if act == "gelu_pytorch_tanh" else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = VisionLayerNorm(config.hidden_size)
        self.norm2 = VisionLayerNorm(config.hidden_size)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, meta: VisionGridMeta, rotary: RotaryEmbedding) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), meta, rotary)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """merge_unit neighbouring patches -> one LLM token: norm, concat, MLP (exact gelu).

    `postshuffle_norm` (the deepstack mergers) normalizes after the concat.
    """

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = config.hidden_size * config.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = VisionLayerNorm(self.merged if postshuffle_norm else config.hidden_size)
        self.linear_fc1 = _linear(self.merged, self.merged)
        self.linear_fc2 = _linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x [N, hidden] -> [N / merge_unit, out_hidden]."""
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, self.merged))
        else:
            x = self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel == stride (Tp, P, P), as a matmul over flattened patches."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = _linear(config.patch_dim, config.hidden_size)
        self.conv_shape = (config.hidden_size, config.in_channels, config.temporal_patch_size,
                           config.patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Shapes: pixel_values [N, C*Tp*P*P] -> [N, hidden]."""
        return self.proj(pixel_values)

    def load_checkpoint(self, reader: CheckpointReader, key_prefix: str) -> list[str]:
        """Read the Conv3d weight [hidden, C, Tp, P, P] as the matmul's [hidden, C*Tp*P*P]."""
        weight_key, bias_key = key_prefix + "proj.weight", key_prefix + "proj.bias"
        for key, param, shape in ((weight_key, self.proj.weight, self.conv_shape),
                                  (bias_key, self.proj.bias, tuple(self.proj.bias.shape))):
            found = tuple(reader.shape(key))
            if found != shape:
                raise CheckpointError(f"tensor {key} has shape {list(found)}, expected {list(shape)}")
            param.data.copy_(reader.read(key).reshape(param.shape))
        return [weight_key, bias_key]


def _check_config(config: VisionConfig) -> int:
    """Validate what the tower assumes; returns the position table's side."""
    side = round(config.num_position_embeddings**0.5)
    if side * side != config.num_position_embeddings:
        raise ConfigError(f"num_position_embeddings {config.num_position_embeddings} is not a square")
    if config.hidden_size % config.num_heads or config.head_dim % 4:
        raise ConfigError(
            f"vision hidden_size {config.hidden_size} / num_heads {config.num_heads} must give "
            "a head_dim divisible by 4 (2-D rotary)"
        )
    if config.hidden_act not in _MLP_ACTIVATIONS:
        raise ConfigError(f"vision hidden_act {config.hidden_act!r} not supported: {_MLP_ACTIVATIONS}")
    layers = config.deepstack_visual_indexes
    if len(set(layers)) != len(layers) or any(not 0 <= i < config.depth for i in layers):
        raise ConfigError(f"deepstack_visual_indexes {list(layers)}: must be distinct blocks "
                          f"of the {config.depth}")
    return side


class Qwen3VLVisionModel(nn.Module):
    """The replicated vision encoder.

    Args:
        config: the vision part of the model config.
        dtype: parameter and output dtype.
        device: where parameters and outputs live.
    """

    def __init__(self, config: VisionConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu"):
        super().__init__()
        side = _check_config(config)
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        with torch.device(self.device):
            self.patch_embed = VisionPatchEmbed(config)
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
            self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
            self.merger = VisionPatchMerger(config, postshuffle_norm=False)
            self.deepstack_merger_list = nn.ModuleList(
                VisionPatchMerger(config, postshuffle_norm=True)
                for _ in config.deepstack_visual_indexes
            )
        self.to(dtype).requires_grad_(False)
        self._deepstack_slot = {layer: i for i, layer in enumerate(config.deepstack_visual_indexes)}
        self.grid_cache = VisionGridCache(side, config.spatial_merge_size, config.head_dim, self.device)

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of images (or video frames).

        Shapes: pixel_values [N_patch, C*Tp*P*P] (patches of image i follow
        those of image i-1, merge blocks contiguous); grid_thw [n, 3] int64 (t, h, w
        in patches) -> embeds [N_patch / merge_unit, out_hidden],
        deepstack [len(deepstack_visual_indexes), N_patch / merge_unit, out_hidden],
        both in the model's dtype.
        Raises:
            VisionInputError: shapes, grids and patch counts disagree.
        """
        meta = self.grid_cache.get(self._grids(pixel_values, grid_thw))
        rotary = self.grid_cache.rotary
        x = self.patch_embed(pixel_values.to(device=self.device, dtype=self.dtype))
        # fp32 taps and accumulation, as transformers; one bag of 4 rows per patch.
        pos = F.embedding_bag(meta.pos_indices, self.pos_embed.weight.float(),
                              per_sample_weights=meta.pos_weights, mode="sum")
        x = x + pos.to(x.dtype)
        deepstack = []
        for layer, block in enumerate(self.blocks):
            x = block(x, meta, rotary)
            slot = self._deepstack_slot.get(layer)
            if slot is not None:
                deepstack.append(self.deepstack_merger_list[slot](x))
        embeds = self.merger(x)
        if not deepstack:
            return embeds, embeds.new_empty((0, *embeds.shape))
        return embeds, torch.stack(deepstack)

    def set_attention_backend(self, backend: str) -> None:
        """Run later calls' attention on `backend` (one of ATTENTION_BACKENDS)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
        for block in self.blocks:
            block.attn.backend = backend

    def _grids(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[Grid, ...]:
        cfg = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise VisionInputError(
                f"pixel_values must be [N_patch, {cfg.patch_dim}], got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise VisionInputError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise VisionInputError(f"grid_thw must be [n >= 1, 3], got {tuple(grid_thw.shape)}")
        if grid_thw.is_floating_point() or grid_thw.is_complex():
            raise VisionInputError(f"grid_thw must be integer, got {grid_thw.dtype}")
        grids = tuple(tuple(row) for row in grid_thw.tolist())
        merge = cfg.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise VisionInputError(
                    f"grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w "
                    f"multiples of spatial_merge_size {merge}")
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise VisionInputError(
                f"grid_thw describes {total} patches but pixel_values has {pixel_values.shape[0]}")
        return grids

    def load_weights(self, reader: CheckpointReader, prefix: str = "model.visual.") -> list[str]:
        """Load every parameter from `prefix + name`, reading no other key.

        Returns the checkpoint keys read.
        Raises:
            CheckpointError: naming every missing key, or a key whose shape is wrong.
        """
        missing = [prefix + name for name, _ in self.named_parameters() if not reader.has(prefix + name)]
        if missing:
            raise CheckpointError(f"vision tower: {len(missing)} tensors missing from the "
                                  f"checkpoint: {', '.join(missing)}")
        return load_module(self, reader, lambda name: prefix + name)
