"""CPU references of the CUDA kernels against straightforward torch code."""

import numpy as np
import pytest
import torch

from cachedattn import kernels, native


def inv_freq_for(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def torch_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE at absolute positions, in float64, as transformers writes it."""
    x = x.double()
    rd = 2 * inv_freq.numel()
    ang = positions.double()[:, None] * inv_freq.double()[None, :]  # [tokens, rd/2]
    cos, sin = ang.cos(), ang.sin()
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    else:
        x0, x1 = rot[..., : rd // 2], rot[..., rd // 2 :]
        out = torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return torch.cat([out, rest], dim=-1)


LAYOUTS = [  # (head_dim, rotary_dim, interleaved): llama-like, phi/neox partial, gptj/cohere interleaved
    (64, 64, False),
    (80, 32, False),
    (64, 64, True),
    (128, 64, True),
]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("head_dim,rotary_dim,interleaved", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("delta", [37, -300])
def test_rotation_moves_keys_to_new_positions(head_dim, rotary_dim, interleaved, dtype, delta):
    torch.manual_seed(0)
    heads, tokens = 3, 50
    inv = inv_freq_for(rotary_dim).float()
    raw = torch.randn(1, heads, tokens, head_dim, dtype=torch.float64)
    pos = torch.arange(400, 400 + tokens)
    keys = torch_rope(raw, pos, inv, interleaved).to(dtype)  # cached post-RoPE keys
    got = kernels.rope_rotate(keys, delta, inv, rotary_dim=rotary_dim, interleaved=interleaved)
    want = torch_rope(raw, pos + delta, inv, interleaved)
    err = (got.double() - want).abs().max().item()
    assert err < TOL[dtype] * max(1.0, want.abs().max().item()), err
    # The pass-through dims are copied bit for bit.
    assert torch.equal(got[..., rotary_dim:], keys[..., rotary_dim:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_float32_matches_torch_formula_closely_and_in_place(interleaved):
    torch.manual_seed(1)
    inv = inv_freq_for(32).float()  # the model's float32 inv_freq is the ground truth
    keys = torch.randn(2, 4, 33, 48)
    want = torch_rope(keys.double(), torch.full((33,), 12345), inv, interleaved)
    kernels.rope_rotate(keys, 12345, inv, interleaved=interleaved, out=keys)
    assert (keys.double() - want).abs().max().item() < 1e-5


def test_zero_delta_is_identity_bitwise_for_every_half_value():
    # cos=1, sin=0: any error in the fp16/bf16 conversions shows up here.
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = bits.view(dtype).reshape(-1, 64).clone()
        # Zeros may change sign (-0 - -0 = +0 in IEEE arithmetic): compare them by value.
        finite = torch.isfinite(x) & (x != 0)
        out = kernels.rope_rotate(x, 0, torch.ones(32))
        assert torch.equal(out.view(torch.int16)[finite], x.view(torch.int16)[finite]), dtype
        assert (out[x == 0] == 0).all()
        assert torch.isnan(out[torch.isnan(x)]).all()


def test_half_rounding_matches_torch():
    torch.manual_seed(2)
    x = torch.randn(256, 64) * 100
    inv = inv_freq_for(64).float()
    ref = kernels.rope_rotate(x, 99, inv)
    for dtype in (torch.float16, torch.bfloat16):
        # Same float math, then the conversion: must equal torch's round-to-nearest-even.
        got = kernels.rope_rotate(x.to(dtype).float(), 99, inv).to(dtype)
        got_native = kernels.rope_rotate(x.to(dtype), 99, inv)
        assert torch.equal(got_native, got), dtype
    assert ref.dtype == torch.float32


def test_empty_keys():
    out = kernels.rope_rotate(torch.empty(0, 64), 5, torch.ones(32))
    assert out.shape == (0, 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rotary_dim=30), "entries"),
        (dict(rotary_dim=128), "rotary_dim"),
        (dict(rotary_dim=0, inv_freq=torch.ones(0)), "rotary_dim must be even"),
    ],
)
def test_rope_argument_errors(kwargs, match):
    keys = torch.randn(4, 64)
    args = dict(inv_freq=torch.ones(32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kernels.rope_rotate(keys, 1, **args)


def test_rope_rejects_unsupported_dtype_and_layout():
    with pytest.raises(ValueError, match="dtype"):
        kernels.rope_rotate(torch.randn(4, 64, dtype=torch.float64), 1, torch.ones(32))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.rope_rotate(torch.randn(64, 4).t(), 1, torch.ones(2))


def test_segment_copy_gathers_like_torch_indexing(rng):
    torch.manual_seed(3)
    chunks = [torch.randn(int(n), 8, 16) for n in rng.integers(1, 40, 12)]
    dst = torch.full((sum(c.shape[0] for c in chunks), 8, 16), float("nan"))
    pairs, row = [], 0
    for c in chunks:
        pairs.append((c, dst[row : row + c.shape[0]]))
        row += c.shape[0]
    kernels.segment_copy(pairs)
    assert torch.equal(dst, torch.cat(chunks))


def test_segment_copy_size_mismatch():
    with pytest.raises(ValueError, match="sizes differ"):
        kernels.segment_copy([(torch.zeros(4), torch.zeros(5))])


def test_segment_copy_raw_bytes(rng):
    a = rng.integers(0, 256, 1000, dtype=np.uint8)
    b = np.zeros(1000, dtype=np.uint8)
    native.segment_copy_cpu([(a.ctypes.data + 10, b.ctypes.data + 3, 500), (a.ctypes.data, b.ctypes.data + 600, 7)])
    assert np.array_equal(b[3:503], a[10:510]) and np.array_equal(b[600:607], a[:7])


# The copy-engine API every caller (and the fake engine) is written against: GPU_API.md.
ENGINE_API = [
    "device", "num_layers", "stream", "begin_epoch", "end_epoch", "copy_batch", "copy_2d", "segment_copy", "rope_copy",
    "wait_for_stream", "stream_wait_layer", "wait_layer", "layer_done", "record", "ticket_done",
    "wait_ticket", "synchronize",
]


def test_native_copy_engine_offers_the_agreed_api():
    missing = [name for name in ENGINE_API if not hasattr(native._core.CopyEngine, name)]
    assert not missing, f"native CopyEngine lacks {missing}"


@pytest.mark.skipif(native.cuda_available(), reason="checks the no-GPU refusal")
def test_copy_engine_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="needs a GPU") as info:
        native.CopyEngine(0, 4)
    assert native.cuda_unavailable_reason() in str(info.value)
    # The raw class refuses too (no engine that pretends to copy).
    with pytest.raises((ValueError, RuntimeError), match="CUDA"):
        native._core.CopyEngine(0, 4)


class _RecordingEngine:
    """Stands in for the copy engine: records the calls kernels.py makes, in order."""

    device = 0

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_segment_copy_of_cpu_tensors_through_an_engine_needs_no_stream_wait():
    # With only host tensors there is no compute stream to wait for (and no CUDA to ask).
    engine = _RecordingEngine()
    a, b = torch.arange(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    kernels.segment_copy([(a, b)], engine=engine, direction="d2h", layer=2)
    assert engine.calls == [("segment_copy", "d2h", [(a.data_ptr(), b.data_ptr(), 8)], 2)]
