"""Execution paths of `CondConv2d`: the same function ``y[b] = conv(x[b], sum_e r[b, e] W_e)``, computed
several ways, because the fastest way depends on the shape, the batch size, the device and whether a
backward pass follows.

Paths (`PATHS`):

- ``"grouped"``: mix the per-example kernels with one matmul, then fold the batch into the channel axis
  and run one grouped conv with ``B x groups`` groups. Any conv; natural for depthwise convs, and at
  batch 1 it is exactly "mix once, then the static conv".
- ``"bmm"``: 1x1 unpadded convs (any stride: the input is subsampled first) as one batched matmul
  ``[B, out, in] @ [B, in, HW]`` (``[B, HW, in] @ [B, in, out]`` for channels_last inputs, so neither
  layout is copied).
- ``"expert"``: the expert-output form: all experts' outputs with one conv (``E x`` the conv's MADDs),
  then mix the outputs. Needs no per-example kernels; wins only where the output is tiny.
- ``"unfold"``: im2col + batched matmul. The fastest CPU path for regular (ungrouped) kxk convs at batch
  > 1; never competitive for depthwise convs (im2col copies each input pixel kh x kw times).

``"grouped"``, ``"bmm"`` and ``"unfold"`` run through a custom autograd function (`_MixedKernelConv`) that
processes the batch in chunks (`chunk_size`) and recomputes each chunk's kernels in backward instead of
saving them: the ``B x kernel`` tensor is never alive all at once, which bounds memory. On CPU the
per-chunk kernels and kernel gradients live in reusable per-thread scratch buffers (`_Workspace`): a
fresh buffer above glibc's mmap threshold is page-faulted on every call, which cost more than the
mixing itself in our measurements (see docs/benchmarks.md).

Choosing (`resolve_path`): a layer's ``path`` is ``"auto"`` (shape rules, `heuristic_path`), ``"measure"``
(time each legal path once per (shape, dtype, device, grad), cache the winner in this process's
`MEASURED_PATHS`), or a path name (forced; tests and benchmarks use this).

Under `torch.compile`, the whole layer is one opaque custom op (``condconv::cond_conv2d``, with its own
backward op) whose fake implementation has symbolic shapes, so ``dynamic=True`` graphs serve every batch
size without recompiling, and the fast eager kernels run inside.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PATHS",
    "POLICIES",
    "ConvGeometry",
    "layer_geometry",
    "unfold_conv",
    "MEASURED_PATHS",
    "legal_paths",
    "heuristic_path",
    "resolve_path",
    "chunk_size",
    "release_workspace",
    "condconv2d",
    "path_forward",
    "path_backward",
]

PATHS = ("grouped", "bmm", "expert", "unfold")
POLICIES = ("auto", "measure")

# Transient per-chunk buffers (mixed kernels, their gradients) are kept below this size. On CPU, glibc
# serves allocations below its dynamic mmap threshold (at most 32 MiB) from the heap and reuses them; a
# larger buffer is mmap'd fresh and page-faulted on every call. On CUDA, the caching allocator reuses
# any size, so the budget only bounds peak memory.
_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a CondConv2d that the paths need, with padding already resolved to integers."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    num_experts: int

    def __post_init__(self) -> None:
        # Hashed on every forward (path and chunk caches): compute it once.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f) for f in self.__dataclass_fields__)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    @property
    def kernel_numel(self) -> int:
        """Elements of one example's mixed kernel: out x in/groups x kh x kw."""
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 ungrouped unpadded conv (any stride): a matmul per example, the ``bmm`` path applies."""
        return self.kernel_size == (1, 1) and self.groups == 1 and self.padding == (0, 0)

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group."""
        return self.groups == self.in_channels and self.groups > 1

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """Output spatial size for an input of ``height x width``."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) for stride-1 "same" padding; asymmetric for even kernels."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return tw // 2, tw - tw // 2, th // 2, th - th // 2


def layer_geometry(layer) -> tuple[ConvGeometry, Optional[tuple[int, int, int, int]]]:
    """A CondConv2d's `ConvGeometry`, and the ``F.pad`` amounts to apply first where its string padding
    ("same" with an even kernel) is asymmetric (else None)."""
    return _layer_geometry(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        layer.groups, layer.num_experts,
    )


@lru_cache(maxsize=4096)
def _layer_geometry(
    in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int] | str, dilation: tuple[int, int], groups: int, num_experts: int,
) -> tuple[ConvGeometry, Optional[tuple[int, int, int, int]]]:
    pre_pad = None
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        left, right, top, bottom = same_padding(kernel_size, dilation)
        if left == right and top == bottom:
            padding = (top, left)
        else:
            padding, pre_pad = (0, 0), (left, right, top, bottom)
    elif isinstance(padding, str):
        raise ValueError(f"padding={padding!r}; expected an int, a pair, 'same' or 'valid'")
    geom = ConvGeometry(
        in_channels, out_channels, kernel_size, stride, _pair(padding), dilation, groups, num_experts
    )
    return geom, pre_pad


def _channels_last(x: torch.Tensor) -> bool:
    # Same rule in the eager kernels and in the custom op's fake implementation.
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def chunk_size(geom: ConvGeometry, batch: int, dtype: torch.dtype, device: torch.device) -> int:
    """Examples per chunk: as many as keep one chunk's mixed kernels under the device's buffer budget, but
    at least ``num_experts`` (each chunk re-reads all E expert kernels to mix its own: fewer examples
    than experts per chunk would cost more reading than the chunk's kernels cost writing)."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"])
    return _chunk_size(geom.kernel_numel, geom.num_experts, batch, dtype.itemsize, budget)


@lru_cache(maxsize=4096)
def _chunk_size(kernel_numel: int, experts: int, batch: int, itemsize: int, budget: int) -> int:
    if budget <= 1:  # tests: one example per chunk
        return 1
    return max(1, min(batch, max(experts, budget // max(kernel_numel * itemsize, 1))))


class _Workspace(threading.local):
    """Per-thread scratch buffers for the per-chunk kernels and kernel gradients (CPU only).

    A buffer above glibc's mmap threshold (32 MiB at most) is returned to the OS when freed and
    page-faulted again on the next call, which on the machines we measured cost ~0.5 ms per MiB, more
    than the mixing itself. The buffers live only inside one forward or backward call of one layer,
    so one per slot and thread serves every layer. `release_workspace` frees them.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}


_WORKSPACE = _Workspace()


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are re-made, at the next call's size, when needed)."""
    _WORKSPACE.buffers.clear()


def _scratch(slot: int, shape: tuple[int, ...], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A [shape] view of a reusable buffer, or None (allocate normally) off CPU, while autograd records,
    or for buffers small enough that the allocator reuses them anyway."""
    numel = math.prod(shape)
    if numel < _SCRATCH_MIN_NUMEL or like.device.type != "cpu" or torch.is_grad_enabled():
        return None
    key = (slot, like.dtype)
    buf = _WORKSPACE.buffers.get(key)
    if buf is None or buf.numel() < numel:
        # A normal tensor even under inference_mode (Lightning's validation): an inference tensor
        # could not be written later under plain no_grad (count_madds, a routing report).
        with torch.inference_mode(False):
            buf = _WORKSPACE.buffers[key] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel].view(shape)


_SCRATCH_MIN_NUMEL = 2**20  # below ~4 MiB, glibc's heap reuses freed buffers: plain allocation is cheaper


# ---------------------------------------------------------------------------------------------------
# Kernels. Each takes x [B, C, H, W], r [B, E], weight [E, out, in/g, kh, kw] and a ConvGeometry.


def _mix(r: torch.Tensor, weight_flat: torch.Tensor) -> torch.Tensor:
    """Per-example kernels, flat: [c, N] = r [c, E] @ weight [E, N] (in scratch memory where possible)."""
    out = _scratch(0, (r.shape[0], weight_flat.shape[1]), weight_flat)
    return torch.mm(r, weight_flat) if out is None else torch.mm(r, weight_flat, out=out)


def _subsample(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    return x if stride == (1, 1) else x[:, :, :: stride[0], :: stride[1]]


def _bmm_forward(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int) -> torch.Tensor:
    xs = _subsample(x, geom.stride)
    batch, channels, height, width = xs.shape
    out_ch, length = geom.out_channels, height * width
    wflat = weight.reshape(geom.num_experts, -1)
    if _channels_last(x):
        # [B, HW, C] is a view of channels_last memory; compute y^T = x^T @ K^T straight into a
        # channels_last output.
        xt = xs.permute(0, 2, 3, 1).reshape(batch, length, channels)
        y = torch.empty(batch, out_ch, height, width, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        yt = y.permute(0, 2, 3, 1).view(batch, length, out_ch)
        for i in range(0, batch, chunk):
            k = _mix(r[i : i + chunk], wflat).view(-1, out_ch, channels)
            torch.bmm(xt[i : i + chunk], k.transpose(1, 2), out=yt[i : i + chunk])
        return y
    xm = xs.reshape(batch, channels, length)
    if chunk >= batch:
        return torch.bmm(_mix(r, wflat).view(batch, out_ch, channels), xm).view(batch, out_ch, height, width)
    y = torch.empty(batch, out_ch, height, width, dtype=x.dtype, device=x.device)
    ym = y.view(batch, out_ch, length)
    for i in range(0, batch, chunk):
        k = _mix(r[i : i + chunk], wflat).view(-1, out_ch, channels)
        torch.bmm(k, xm[i : i + chunk], out=ym[i : i + chunk])
    return y


def _grouped_conv(x: torch.Tensor, kernels: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """One conv over a chunk with its batch folded into channels: [c, C, H, W] -> [c, out, Ho, Wo]."""
    c, channels, height, width = x.shape
    y = F.conv2d(
        x.reshape(1, c * channels, height, width),
        kernels.view(c * geom.out_channels, channels // geom.groups, *geom.kernel_size),
        None, geom.stride, geom.padding, geom.dilation, c * geom.groups,
    )
    return y.view(c, geom.out_channels, y.shape[-2], y.shape[-1])


def _grouped_forward(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int) -> torch.Tensor:
    batch = x.shape[0]
    wflat = weight.reshape(geom.num_experts, -1)
    if chunk >= batch:
        y = _grouped_conv(x, _mix(r, wflat), geom)
    else:
        y = torch.cat([_grouped_conv(x[i : i + chunk], _mix(r[i : i + chunk], wflat), geom) for i in range(0, batch, chunk)])
    return y.contiguous(memory_format=_memory_format(x))


def _expert_forward(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int) -> torch.Tensor:
    """All experts' outputs from one conv (weights ordered [g, E, out/g] so groups stay intact), then mix."""
    experts, g = geom.num_experts, geom.groups
    out_g = geom.out_channels // g
    w = weight.reshape(experts, g, out_g, *weight.shape[2:]).transpose(0, 1).reshape(g * experts * out_g, *weight.shape[2:])
    ys = F.conv2d(x, w, None, geom.stride, geom.padding, geom.dilation, g)
    batch, _, out_h, out_w = ys.shape
    ys = ys.reshape(batch, g, experts, out_g * out_h * out_w)
    y = torch.matmul(r.view(batch, 1, 1, experts), ys)  # [B, g, 1, out/g * Ho * Wo]
    return y.view(batch, geom.out_channels, out_h, out_w).contiguous(memory_format=_memory_format(x))


def unfold_conv(x: torch.Tensor, kernels: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Per-example conv with given kernels [B, out, in/g, kh, kw] as im2col + matmul: [B, g, out/g, K] @ [B, g, K, L]."""
    batch, _, height, width = x.shape
    g = geom.groups
    kernels = kernels.reshape(batch, g, geom.out_channels // g, -1)
    cols = F.unfold(x, geom.kernel_size, geom.dilation, geom.padding, geom.stride)  # [B, C*kh*kw, L]
    cols = cols.reshape(batch, g, kernels.shape[-1], cols.shape[-1])
    out_h, out_w = geom.out_size(height, width)
    y = torch.matmul(kernels, cols).reshape(batch, geom.out_channels, out_h, out_w)
    return y.contiguous(memory_format=_memory_format(x))


def _unfold_forward(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int) -> torch.Tensor:
    wflat = weight.reshape(geom.num_experts, -1)
    batch = x.shape[0]
    if chunk >= batch:
        return unfold_conv(x, _mix(r, wflat), geom)
    return torch.cat([unfold_conv(x[i : i + chunk], _mix(r[i : i + chunk], wflat), geom) for i in range(0, batch, chunk)])


_FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "grouped": _grouped_forward,
    "bmm": _bmm_forward,
    "expert": _expert_forward,
    "unfold": _unfold_forward,
}


def _mixing_grads(
    gk: torch.Tensor, r: torch.Tensor, wflat: torch.Tensor, gr: Optional[torch.Tensor], gw: Optional[torch.Tensor], i: int
) -> None:
    """From one chunk's kernel gradient gk [c, N]: gr[chunk] = gk @ W^T, gw += r[chunk]^T @ gk."""
    c = gk.shape[0]
    if gr is not None:
        torch.mm(gk, wflat.t(), out=gr[i : i + c])
    if gw is not None:
        if gw.dtype == gk.dtype:
            gw.addmm_(r[i : i + c].t(), gk)
        else:  # low-precision inputs: accumulate the chunks in fp32
            gw.add_(torch.mm(r[i : i + c].t(), gk))


def _bmm_backward(
    gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    xs = _subsample(x, geom.stride)
    batch, channels, height, width = xs.shape
    out_ch, length = geom.out_channels, height * width
    wflat = weight.reshape(geom.num_experts, -1)
    need_x, need_r, need_w = needs
    gr = torch.empty_like(r) if need_r else None
    gw = torch.zeros(wflat.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
    gxs = None
    if _channels_last(x):
        xt = xs.permute(0, 2, 3, 1).reshape(batch, length, channels)
        gyt = gy.permute(0, 2, 3, 1).reshape(batch, length, out_ch)
        if need_x:
            gxs = torch.empty(batch, channels, height, width, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            gxt = gxs.permute(0, 2, 3, 1).view(batch, length, channels)
        for i in range(0, batch, chunk):
            rc = r[i : i + chunk]
            if need_x:
                k = _mix(rc, wflat).view(-1, out_ch, channels)
                torch.bmm(gyt[i : i + chunk], k, out=gxt[i : i + chunk])
            if need_r or need_w:
                gyc, xc = gyt[i : i + chunk].transpose(1, 2), xt[i : i + chunk]
                gk = torch.bmm(gyc, xc, out=_scratch(1, (gyc.shape[0], out_ch, channels), gyc))  # [c, out, C]
                _mixing_grads(gk.view(gk.shape[0], -1), r, wflat, gr, gw, i)
    else:
        xm = xs.reshape(batch, channels, length)
        gym = gy.reshape(batch, out_ch, length)
        if need_x:
            gxs = torch.empty(batch, channels, height, width, dtype=x.dtype, device=x.device)
            gxm = gxs.view(batch, channels, length)
        for i in range(0, batch, chunk):
            rc = r[i : i + chunk]
            if need_x:
                k = _mix(rc, wflat).view(-1, out_ch, channels)
                torch.bmm(k.transpose(1, 2), gym[i : i + chunk], out=gxm[i : i + chunk])
            if need_r or need_w:
                gyc, xc = gym[i : i + chunk], xm[i : i + chunk].transpose(1, 2)
                gk = torch.bmm(gyc, xc, out=_scratch(1, (gyc.shape[0], out_ch, channels), gyc))  # [c, out, C]
                _mixing_grads(gk.view(gk.shape[0], -1), r, wflat, gr, gw, i)
    gx = gxs
    if need_x and geom.stride != (1, 1):
        gx = torch.zeros_like(x, memory_format=_memory_format(x))
        gx[:, :, :: geom.stride[0], :: geom.stride[1]] = gxs
    return gx, gr, _finish_gw(gw, weight)


def _grouped_backward(
    gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    batch, channels, height, width = x.shape
    out_h, out_w = gy.shape[-2:]
    wflat = weight.reshape(geom.num_experts, -1)
    need_x, need_r, need_w = needs
    need_k = need_r or need_w
    gr = torch.empty_like(r) if need_r else None
    gw = torch.zeros(wflat.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
    gxs = []
    for i in range(0, batch, chunk):
        xc, gyc = x[i : i + chunk], gy[i : i + chunk]
        c = xc.shape[0]
        k = _mix(r[i : i + chunk], wflat)
        gxc, gk, _ = torch.ops.aten.convolution_backward(
            gyc.reshape(1, c * geom.out_channels, out_h, out_w),
            xc.reshape(1, c * channels, height, width),
            k.view(c * geom.out_channels, channels // geom.groups, *geom.kernel_size),
            None, list(geom.stride), list(geom.padding), list(geom.dilation), False, [0, 0], c * geom.groups,
            [need_x, need_k, False],
        )
        if need_x:
            gxs.append(gxc.view(c, channels, height, width))
        if need_k:
            _mixing_grads(gk.reshape(c, -1), r, wflat, gr, gw, i)
    gx = None
    if need_x:
        gx = (gxs[0] if len(gxs) == 1 else torch.cat(gxs)).contiguous(memory_format=_memory_format(x))
    return gx, gr, _finish_gw(gw, weight)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _finish_gw(gw: Optional[torch.Tensor], weight: torch.Tensor) -> Optional[torch.Tensor]:
    return None if gw is None else gw.to(weight.dtype).view(weight.shape)


def _expert_backward(
    gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of the expert-output form; recomputes the experts' outputs when gr is needed."""
    experts, g = geom.num_experts, geom.groups
    out_g = geom.out_channels // g
    kshape = weight.shape[2:]
    w = weight.reshape(experts, g, out_g, *kshape).transpose(0, 1).reshape(g * experts * out_g, *kshape)
    batch = x.shape[0]
    out_h, out_w = gy.shape[-2:]
    gy = gy.reshape(batch, g, 1, out_g * out_h * out_w)
    need_x, need_r, need_w = needs
    gr = None
    if need_r:
        ys = F.conv2d(x, w, None, geom.stride, geom.padding, geom.dilation, g).reshape(batch, g, experts, -1)
        gr = (ys * gy).sum(dim=(1, 3))
    gx = gw = None
    if need_x or need_w:
        gys = (r.view(batch, 1, experts, 1) * gy).reshape(batch, g * experts * out_g, out_h, out_w)
        gx, gw_r, _ = torch.ops.aten.convolution_backward(
            gys, x, w, None, list(geom.stride), list(geom.padding), list(geom.dilation), False, [0, 0], g,
            [need_x, need_w, False],
        )
        if need_w:
            gw = gw_r.reshape(g, experts, out_g, *kshape).transpose(0, 1).reshape(weight.shape)
        if need_x:
            gx = gx.contiguous(memory_format=_memory_format(x))
    return gx, gr, gw


def _unfold_backward(
    gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of im2col + matmul, per chunk: gK = gy @ cols^T, gcols = K^T @ gy folded back onto x."""
    batch, channels, height, width = x.shape
    g = geom.groups
    wflat = weight.reshape(geom.num_experts, -1)
    need_x, need_r, need_w = needs
    gr = torch.empty_like(r) if need_r else None
    gw = torch.zeros(wflat.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_w else None
    gxs = []
    for i in range(0, batch, chunk):
        xc = x[i : i + chunk]
        c = xc.shape[0]
        gym = gy[i : i + chunk].reshape(c, g, geom.out_channels // g, -1)  # [c, g, out/g, L]
        if need_x:
            k = _mix(r[i : i + chunk], wflat).view(c, g, geom.out_channels // g, -1)
            gcols = torch.matmul(k.transpose(2, 3), gym).reshape(c, -1, gym.shape[-1])
            gxs.append(F.fold(gcols, (height, width), geom.kernel_size, geom.dilation, geom.padding, geom.stride))
        if need_r or need_w:
            cols = F.unfold(xc, geom.kernel_size, geom.dilation, geom.padding, geom.stride)
            cols = cols.reshape(c, g, -1, cols.shape[-1])  # [c, g, K, L]
            _mixing_grads(torch.matmul(gym, cols.transpose(2, 3)).reshape(c, -1), r, wflat, gr, gw, i)
    gx = None
    if need_x:
        gx = (gxs[0] if len(gxs) == 1 else torch.cat(gxs)).contiguous(memory_format=_memory_format(x))
    return gx, gr, _finish_gw(gw, weight)


_BACKWARDS = {
    "grouped": _grouped_backward,
    "bmm": _bmm_backward,
    "expert": _expert_backward,
    "unfold": _unfold_backward,
}
# Paths whose eager autograd goes through `_MixedKernelConv` (chunked, kernels recomputed in backward);
# "expert" is plain differentiable torch code in eager mode (its hand-written backward serves the
# compiled custom op and the "measure" timing).
_CUSTOM_AUTOGRAD = frozenset({"grouped", "bmm", "unfold"})


def path_forward(path: str, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, chunk: int) -> torch.Tensor:
    """Run one path's forward kernel (no autograd wrapping)."""
    return _FORWARDS[path](x, r, weight, geom, chunk)


def path_backward(
    path: str, gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry,
    chunk: int, needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (x, r, weight) of one path given the output gradient; None where ``needs`` is False."""
    return _BACKWARDS[path](gy, x, r, weight, geom, chunk, tuple(needs))


class _MixedKernelConv(torch.autograd.Function):
    """Autograd for the mixed-kernel paths that saves x, r and weight but not the B x kernel tensor."""

    @staticmethod
    def forward(ctx, x, r, weight, path, geom, chunk):  # type: ignore[override]
        ctx.save_for_backward(x, r, weight)
        ctx.path, ctx.geom, ctx.chunk = path, geom, chunk
        return path_forward(path, x, r, weight, geom, chunk)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, r, weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        gx, gr, gw = path_backward(ctx.path, gy, x, r, weight, ctx.geom, ctx.chunk, needs)
        return gx, gr, gw, None, None, None


# ---------------------------------------------------------------------------------------------------
# Choosing a path.


def legal_paths(geom: ConvGeometry) -> tuple[str, ...]:
    """The paths that can compute this geometry."""
    return tuple(p for p in PATHS if p != "bmm" or geom.is_pointwise)


@lru_cache(maxsize=4096)
def heuristic_path(geom: ConvGeometry, batch: int, height: int, width: int, grad: bool, device_type: str) -> str:
    """The path the shape rules pick (measured on CPU, see docs/benchmarks.md). Pure, hence cached."""
    out_h, out_w = geom.out_size(height, width)
    if out_h * out_w * (geom.num_experts - 1) <= geom.num_experts and geom.num_experts > 1:
        # A 1x1 output: E convs cost E x L MADDs against the mixing's E + L, so the expert form is no
        # more work and needs no per-example kernels.
        return "expert"
    if geom.is_pointwise:
        return "bmm"
    if geom.groups == 1 and batch > 1 and device_type == "cpu":
        # Regular kxk convs: oneDNN runs a conv with B large groups much slower than im2col + batched
        # matmul (ResNet-50's 3x3 512->512 at 7x7, batch 32 training: ~5x vs ~3x the static conv).
        return "unfold"
    # Depthwise/grouped convs (the batch-folded conv is a plain depthwise conv over B x C channels), and
    # batch 1, where the grouped path is exactly "mix once, then the static conv". On CUDA the grouped
    # conv is the unmeasured default (no GPU was available to tune these rules).
    return "grouped"


class _MeasuredPaths:
    """Per-process cache of measured path choices, keyed by (geometry, input shape, dtype, device, grad).

    Bounded (least recently used entries are dropped). This is a cache of facts about the machine, not
    configuration: clearing it changes speed, never results.
    """

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, str] = OrderedDict()

    def get(self, key: tuple) -> Optional[str]:
        """The cached choice for ``key``, or None."""
        path = self._entries.get(key)
        if path is not None:
            self._entries.move_to_end(key)
        return path

    def put(self, key: tuple, path: str) -> None:
        """Remember ``path`` for ``key``."""
        self._entries[key] = path
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every measured choice."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[tuple, str]]:
        """(key, path) pairs, oldest first."""
        return list(self._entries.items())


MEASURED_PATHS = _MeasuredPaths()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_path(path: str, x, r, weight, geom: ConvGeometry, chunk: int, grad: bool, reps: int = 3) -> float:
    """Median seconds of one forward (+ backward when ``grad``) of ``path`` on detached copies."""
    x, r, weight = x.detach(), r.detach(), weight.detach()
    gy = None
    times = []
    for rep in range(reps + 1):  # the first run warms up and is dropped
        _sync(x.device)
        start = time.perf_counter()
        if grad:
            y = path_forward(path, x, r, weight, geom, chunk)
            gy = torch.ones_like(y) if gy is None else gy
            path_backward(path, gy, x, r, weight, geom, chunk)
        else:
            path_forward(path, x, r, weight, geom, chunk)
        _sync(x.device)
        if rep:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_path(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> str:
    """Time every legal path on these inputs and return the fastest (not cached; see `resolve_path`)."""
    chunk = chunk_size(geom, x.shape[0], x.dtype, x.device)
    # im2col copies every input pixel kh*kw times: never competitive for grouped (e.g. depthwise) convs
    candidates = [p for p in legal_paths(geom) if p != "unfold" or geom.groups == 1]
    with torch.no_grad():
        times = {p: _time_path(p, x, r, weight, geom, chunk, grad) for p in candidates}
    return min(times, key=times.get)


def resolve_path(policy: str, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, grad: bool) -> str:
    """The concrete path for ``policy`` ("auto", "measure" or a path name) on these inputs."""
    if policy in _FORWARDS:
        if policy == "bmm" and not geom.is_pointwise:
            raise ValueError(f"path 'bmm' needs a 1x1 ungrouped unpadded conv; this layer is {geom}")
        return policy
    batch, _, height, width = x.shape
    if policy == "auto":
        return heuristic_path(geom, batch, height, width, grad, x.device.type)
    if policy == "measure":
        key = (geom, tuple(x.shape), x.dtype, str(x.device), grad, _channels_last(x))
        path = MEASURED_PATHS.get(key)
        if path is None:
            path = measure_path(x, r, weight, geom, grad)
            MEASURED_PATHS.put(key, path)
        return path
    raise ValueError(f"CondConv2d path {policy!r} is not one of {POLICIES + PATHS}")


# ---------------------------------------------------------------------------------------------------
# Entry point, eager and compiled.


def _eager(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, policy: str) -> torch.Tensor:
    grad = torch.is_grad_enabled() and (x.requires_grad or r.requires_grad or weight.requires_grad)
    path = resolve_path(policy, x, r, weight, geom, grad)
    chunk = chunk_size(geom, x.shape[0], x.dtype, x.device)
    if grad and path in _CUSTOM_AUTOGRAD:
        return _MixedKernelConv.apply(x, r, weight, path, geom, chunk)
    return path_forward(path, x, r, weight, geom, chunk)


def condconv2d(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, policy: str = "auto") -> torch.Tensor:
    """CondConv2d without bias: ``y[b] = conv(x[b], sum_e r[b, e] weight[e])`` by the path ``policy`` picks."""
    if torch.compiler.is_compiling():
        return torch.ops.condconv.cond_conv2d(
            x, r, weight, list(geom.stride), list(geom.padding), list(geom.dilation), geom.groups, policy
        )
    return _eager(x, r, weight, geom, policy)


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> ConvGeometry:
    return ConvGeometry(
        in_channels=x.shape[1], out_channels=weight.shape[1], kernel_size=(weight.shape[3], weight.shape[4]),
        stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=groups,
        num_experts=weight.shape[0],
    )


@torch.library.custom_op("condconv::cond_conv2d", mutates_args=())
def _cond_conv2d_op(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
    dilation: list[int], groups: int, policy: str,
) -> torch.Tensor:
    geom = _geometry(x, weight, stride, padding, dilation, groups)
    with torch.no_grad():  # autograd is the op's registered backward, not the kernels'
        return _eager(x, r, weight, geom, policy)


@_cond_conv2d_op.register_fake
def _(x, r, weight, stride, padding, dilation, groups, policy):
    # Shapes may be symbolic here (no ConvGeometry: it hashes its fields).
    out_h, out_w = (
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], weight.shape[3:], stride, padding, dilation)
    )
    return x.new_empty(x.shape[0], weight.shape[1], out_h, out_w).contiguous(memory_format=_memory_format(x))


@torch.library.custom_op("condconv::cond_conv2d_backward", mutates_args=())
def _cond_conv2d_backward_op(
    gy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, policy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geom = _geometry(x, weight, stride, padding, dilation, groups)
    path = resolve_path(policy, x, r, weight, geom, grad=True)
    chunk = chunk_size(geom, x.shape[0], x.dtype, x.device)
    gx, gr, gw = path_backward(path, gy.contiguous(memory_format=_memory_format(x)), x, r, weight, geom, chunk)
    return gx.contiguous(memory_format=_memory_format(x)), gr.contiguous(), gw.contiguous()


@_cond_conv2d_backward_op.register_fake
def _(gy, x, r, weight, stride, padding, dilation, groups, policy):
    return (
        x.new_empty(x.shape).contiguous(memory_format=_memory_format(x)),
        r.new_empty(r.shape),
        weight.new_empty(weight.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, r, weight, stride, padding, dilation, groups, policy = inputs
    ctx.save_for_backward(x, r, weight)
    ctx.conv_args = (stride, padding, dilation, groups, policy)


def _backward(ctx, gy):
    x, r, weight = ctx.saved_tensors
    gx, gr, gw = torch.ops.condconv.cond_conv2d_backward(gy, x, r, weight, *ctx.conv_args)
    return gx, gr, gw, None, None, None, None, None


_cond_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
