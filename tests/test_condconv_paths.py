"""Every CondConv2d execution path equals the per-example definition (outputs and gradients), forced one at a
time; the path rules, the measured-choice cache, chunking, channels_last, bf16 and torch.compile."""
from __future__ import annotations

import random
from typing import Optional

import pytest
import torch

from condconv import CondConv2d
from condconv import condconv_paths as cp
from tests.test_layers import random_case, reference_condconv

PATHS = list(cp.PATHS)


def pointwise_case(rng: random.Random) -> dict:
    return dict(
        in_channels=rng.randint(1, 12), out_channels=rng.randint(1, 12), kernel_size=1,
        stride=rng.choice([1, 2, (2, 1)]), padding=0, groups=1, bias=rng.random() < 0.5,
        num_experts=rng.choice([1, 2, 8]),
    )


def case_for(path: str, rng: random.Random) -> dict:
    return pointwise_case(rng) if path == "bmm" else random_case(rng)


def min_size(case: dict) -> int:
    """Smallest input side the case's kernel fits in."""
    k = case["kernel_size"] if isinstance(case["kernel_size"], int) else max(case["kernel_size"])
    d, p = case.get("dilation", 1), case["padding"]
    return max(1, d * (k - 1) + 1 - 2 * p)


def check_against_reference(
    layer: CondConv2d, x: torch.Tensor, r: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
    grad_tol: Optional[float] = None,
) -> torch.Tensor:
    """Outputs (within atol/rtol) and gradients (x, r, weight, bias; within ``grad_tol``, default the same)
    of ``layer`` equal the reference; returns the output."""
    gtol = grad_tol if grad_tol is not None else atol
    grtol = grad_tol if grad_tol is not None else rtol
    x = x.detach().requires_grad_(True)
    r = r.detach().requires_grad_(True)
    y = layer(x, r)
    y_ref = reference_condconv(layer, x, r)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    g = torch.randn_like(y_ref)
    params = [x, r, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    for got, want in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(got, want, atol=gtol, rtol=grtol)
    return y


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer budget of one byte: every path runs one example per chunk."""
    monkeypatch.setitem(cp._CHUNK_BYTES, "cpu", 1)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("path", PATHS)
def test_forced_path_matches_reference_double(path: str, seed: int) -> None:
    rng = random.Random(1000 * PATHS.index(path) + seed)
    torch.manual_seed(seed)
    case = case_for(path, rng)
    batch = [1, 2, 5, 17][seed % 4]
    layer = CondConv2d(**case, path=path).double()
    size = max(rng.randint(4, 11), min_size(case))
    x = torch.randn(batch, case["in_channels"], size, size + 1, dtype=torch.double)
    r = torch.rand(batch, case["num_experts"], dtype=torch.double)
    check_against_reference(layer, x, r)


@pytest.mark.parametrize("path", ["grouped", "bmm"])
@pytest.mark.parametrize("seed", range(4))
def test_chunked_paths_match_reference(path: str, seed: int, tiny_chunks: None) -> None:
    """Chunking the batch (kernels recomputed per chunk in backward) changes nothing."""
    rng = random.Random(50 + seed)
    torch.manual_seed(seed)
    case = case_for(path, rng)
    layer = CondConv2d(**case, path=path).double()
    size = max(8, min_size(case))
    x = torch.randn(5, case["in_channels"], size + 1, size, dtype=torch.double)
    r = torch.rand(5, case["num_experts"], dtype=torch.double)
    assert cp.chunk_size(cp.layer_geometry(layer)[0], 5, torch.double, x.device) == 1
    check_against_reference(layer, x, r)


@pytest.mark.parametrize(
    "path,kernel_size,groups",
    [(p, k, g) for p in PATHS for k, g in [(1, 1), (3, 1), (3, 4), (5, 16)] if p != "bmm" or (k, g) == (1, 1)],
)
def test_forced_path_float32_within_1e5(path: str, kernel_size: int, groups: int) -> None:
    torch.manual_seed(0)
    layer = CondConv2d(16, 16, kernel_size, padding=kernel_size // 2, groups=groups, num_experts=8, path=path)
    x, r = torch.randn(7, 16, 10, 10), torch.rand(7, 8)
    # Outputs within 1e-5; gradients of r and of the experts sum ~10^4 fp32 products (summed in another
    # order than the reference), so 1e-4. The double-precision tests hold gradients to 1e-5.
    check_against_reference(layer, x, r, atol=1e-5, rtol=1e-5, grad_tol=1e-4)


@pytest.mark.parametrize(
    "path,kernel_size,stride,groups",
    [
        (p, k, st, g)
        for p in PATHS
        for k, st, g in [(1, 1, 1), (1, 2, 1), (3, 2, 1), (5, 1, 12)]
        if p != "bmm" or (k, g) == (1, 1)  # bmm is for 1x1 ungrouped convs
    ],
)
def test_channels_last_input(path: str, kernel_size: int, stride: int, groups: int) -> None:
    """channels_last input: same numbers (gradients too) and a channels_last output, as nn.Conv2d gives."""
    torch.manual_seed(1)
    layer = CondConv2d(12, 24, kernel_size, stride, kernel_size // 2, groups=groups, num_experts=4, path=path).double()
    x = torch.randn(3, 12, 9, 9, dtype=torch.double).to(memory_format=torch.channels_last)
    r = torch.rand(3, 4, dtype=torch.double)
    y = check_against_reference(layer, x, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x2 = x.detach().requires_grad_(True)
    layer(x2, r).sum().backward()
    assert x2.grad.is_contiguous(memory_format=torch.channels_last) or x2.grad.is_contiguous()


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16(path: str) -> None:
    """bf16 runs on every path and stays close to the fp32 result of the same (bf16-rounded) numbers."""
    torch.manual_seed(2)
    k, g = (1, 1) if path == "bmm" else (3, 4)
    layer = CondConv2d(16, 32, k, padding=k // 2, groups=g, num_experts=8, path=path)
    x, r = torch.randn(4, 16, 8, 8), torch.rand(4, 8)
    lb = CondConv2d(16, 32, k, padding=k // 2, groups=g, num_experts=8, path=path).to(torch.bfloat16)
    with torch.no_grad():
        lb.weight.copy_(layer.weight)
        layer.weight.copy_(lb.weight.float())
    xb = x.to(torch.bfloat16).requires_grad_(True)
    rb = r.to(torch.bfloat16).requires_grad_(True)
    y = lb(xb, rb)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and lb.weight.grad.dtype == torch.bfloat16
    want = reference_condconv(layer, xb.detach().float(), rb.detach().float())
    torch.testing.assert_close(y.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(3))
def test_hand_written_backward_matches_autograd(path: str, seed: int) -> None:
    """`path_backward` (used by the compiled op and by measurement) equals autograd of the reference."""
    rng = random.Random(300 + seed)
    torch.manual_seed(seed)
    case = case_for(path, rng)
    layer = CondConv2d(**{**case, "bias": False}, path=path).double()
    geom, _ = cp.layer_geometry(layer)
    size = max(7, min_size(case))
    x = torch.randn(3, case["in_channels"], size, size + 2, dtype=torch.double, requires_grad=True)
    r = torch.rand(3, case["num_experts"], dtype=torch.double, requires_grad=True)
    y_ref = reference_condconv(layer, x, r)
    gy = torch.randn_like(y_ref)
    want = torch.autograd.grad(y_ref, [x, r, layer.weight], gy)
    got = cp.path_backward(path, gy, x.detach(), r.detach(), layer.weight.detach(), geom, chunk=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    partial = cp.path_backward(path, gy, x.detach(), r.detach(), layer.weight.detach(), geom, 2, (False, True, False))
    assert partial[0] is None and partial[2] is None
    torch.testing.assert_close(partial[1], want[1])


@pytest.mark.parametrize("path", ["grouped", "bmm"])
def test_only_needed_gradients(path: str) -> None:
    """Frozen experts or an input without grad: the custom backward skips what is not needed."""
    torch.manual_seed(3)
    layer = CondConv2d(6, 8, 1, num_experts=3, path=path).double()
    layer.weight.requires_grad_(False)
    x = torch.randn(4, 6, 5, 5, dtype=torch.double)
    r = torch.rand(4, 3, dtype=torch.double, requires_grad=True)
    (gr,) = torch.autograd.grad(layer(x, r).sum(), [r])
    (gr_ref,) = torch.autograd.grad(reference_condconv(layer, x, r).sum(), [r])
    torch.testing.assert_close(gr, gr_ref)


def test_same_padding_even_kernel_matches_conv() -> None:
    """String padding "same" with an even kernel (asymmetric) is padded first, then any path applies."""
    torch.manual_seed(4)
    for path in ("grouped", "expert", "unfold"):
        layer = CondConv2d(4, 6, 4, padding="same", num_experts=2, path=path).double()
        x, r = torch.randn(2, 4, 7, 7, dtype=torch.double), torch.rand(2, 2, dtype=torch.double)
        check_against_reference(layer, x, r)


def test_heuristic_rules() -> None:
    def geom(k: int, g: int = 1, cin: int = 16, stride: int = 1, pad: int = 0) -> cp.ConvGeometry:
        return cp.ConvGeometry(cin, 32 if g == 1 else cin, (k, k), (stride, stride), (pad, pad), (1, 1), g, 8)

    assert cp.heuristic_path(geom(1), 32, 14, 14, True, "cpu") == "bmm"
    assert cp.heuristic_path(geom(1, stride=2), 32, 14, 14, True, "cpu") == "bmm"
    assert cp.heuristic_path(geom(5, g=16, pad=2), 32, 14, 14, True, "cpu") == "grouped"
    assert cp.heuristic_path(geom(3, pad=1), 1, 7, 7, False, "cpu") == "grouped"
    assert cp.heuristic_path(geom(3, pad=1), 32, 7, 7, True, "cpu") == "unfold"
    assert cp.heuristic_path(geom(3, pad=1), 32, 7, 7, True, "cuda") == "grouped"
    # a 1x1 output: the expert-output form is no more work than mixing
    assert cp.heuristic_path(geom(1), 32, 1, 1, True, "cpu") == "expert"
    assert cp.legal_paths(geom(3, pad=1)) == ("grouped", "expert", "unfold")


def test_measure_policy_caches_its_choice() -> None:
    torch.manual_seed(5)
    cp.MEASURED_PATHS.clear()
    layer = CondConv2d(8, 8, 1, num_experts=4, path="measure")
    x, r = torch.randn(3, 8, 6, 6), torch.rand(3, 4)
    check_against_reference(layer, x, r)  # with grad: measured fwd+bwd
    with torch.no_grad():
        torch.testing.assert_close(layer(x, r), reference_condconv(layer, x, r), atol=1e-5, rtol=1e-5)
    entries = cp.MEASURED_PATHS.items()
    assert len(entries) == 2 and {key[4] for key, _ in entries} == {True, False}
    assert all(path in cp.legal_paths(cp.layer_geometry(layer)[0]) for _, path in entries)
    layer(x, r)
    assert len(cp.MEASURED_PATHS) == 2  # cached: not measured again
    cp.MEASURED_PATHS.clear()


def test_measured_cache_is_bounded() -> None:
    cache = cp._MeasuredPaths(maxsize=2)
    for i in range(3):
        cache.put(("k", i), "bmm")
    assert len(cache) == 2 and cache.get(("k", 0)) is None and cache.get(("k", 2)) == "bmm"


def test_bad_path_raises_value_error() -> None:
    with pytest.raises(ValueError, match="path 'fastest'"):
        CondConv2d(4, 4, 3, path="fastest")
    layer = CondConv2d(4, 4, 3, padding=1, num_experts=2, path="bmm")
    with pytest.raises(ValueError, match="path 'bmm' needs a 1x1"):
        layer(torch.randn(1, 4, 5, 5), torch.rand(1, 2))


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"], counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("path", ["auto", "grouped", "expert"])
def test_compile_dynamic_no_recompile_per_batch_size(path: str) -> None:
    """dynamic=True: one graph serves batch sizes 2, 3, 5 (forward and backward) and matches eager."""
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    torch._dynamo.reset()
    counters.clear()
    layer = CondConv2d(8, 8, 3, padding=1, groups=4, bias=True, num_experts=4, path=path)
    compiled = torch.compile(layer, dynamic=True)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 8, 7, 7, requires_grad=True)
        r = torch.rand(batch, 4, requires_grad=True)
        y = compiled(x, r)
        gx, gr, gw = torch.autograd.grad(y.sum(), [x, r, layer.weight])
        y_eager = layer(x, r)
        want = torch.autograd.grad(y_eager.sum(), [x, r, layer.weight])
        torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
        for got, exp in zip((gx, gr, gw), want):
            torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-5)
    assert _compile_counts() == (1, 1)


# --- CUDA twins of the checks above (skipped without CUDA; see conftest.py) ---------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_cuda_forced_path_matches_reference(path: str, seed: int) -> None:
    """CUDA twin of test_forced_path_matches_reference_double (fp64 on the GPU)."""
    rng = random.Random(2000 + seed)
    torch.manual_seed(seed)
    case = case_for(path, rng)
    layer = CondConv2d(**case, path=path).double().cuda()
    batch = [1, 2, 5, 17][seed % 4]
    x = torch.randn(batch, case["in_channels"], 9, 10, dtype=torch.double, device="cuda")
    r = torch.rand(batch, case["num_experts"], dtype=torch.double, device="cuda")
    check_against_reference(layer, x, r)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_cuda_float32_channels_last_and_bf16(path: str) -> None:
    """CUDA twin of the fp32, channels_last and bf16 checks."""
    torch.manual_seed(7)
    k, g = (1, 1) if path == "bmm" else (3, 4)
    layer = CondConv2d(16, 32, k, padding=k // 2, groups=g, num_experts=8, path=path).cuda()
    x, r = torch.randn(6, 16, 10, 10, device="cuda"), torch.rand(6, 8, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_reference(layer, x, r, atol=1e-4, rtol=1e-4)
    y = check_against_reference(layer, x.to(memory_format=torch.channels_last), r, atol=1e-4, rtol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    yb = layer.to(torch.bfloat16)(x.to(torch.bfloat16), r.to(torch.bfloat16))
    want = reference_condconv(layer.float(), x, r)
    torch.testing.assert_close(yb.float(), want, atol=0.05 * want.abs().max().item(), rtol=0.05)


@pytest.mark.gpu
def test_cuda_compile_dynamic_no_recompile_per_batch_size() -> None:
    """CUDA twin of test_compile_dynamic_no_recompile_per_batch_size."""
    from torch._dynamo.utils import counters

    torch.manual_seed(8)
    torch._dynamo.reset()
    counters.clear()
    layer = CondConv2d(8, 8, 3, padding=1, groups=4, num_experts=4).cuda()
    compiled = torch.compile(layer, dynamic=True)
    for batch in (2, 3, 5):
        x, r = torch.randn(batch, 8, 7, 7, device="cuda"), torch.rand(batch, 4, device="cuda")
        torch.testing.assert_close(compiled(x, r), layer(x, r), atol=1e-4, rtol=1e-4)
    assert _compile_counts() == (1, 1)
