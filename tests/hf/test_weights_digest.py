import subprocess
import sys

import pytest
import torch

from cachedattn.hf.weights import config_digest, model_digest, tensor_digest, weights_digest


def _net(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 10)).to(dtype)


def test_same_weights_same_digest_different_weights_differ():
    a, b = _net(0), _net(0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-3  # the first element is always sampled
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(_net(0)) != weights_digest(_net(1))


def test_dtype_and_shape_are_part_of_it():
    assert weights_digest(_net(0)) != weights_digest(_net(0, torch.bfloat16))
    assert weights_digest(_net(0, torch.bfloat16)) == weights_digest(_net(0, torch.bfloat16))


def test_config_digest_ignores_provenance():
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    assert config_digest(base) == config_digest({**base, "_name_or_path": "/somewhere/else"})
    assert config_digest(base) != config_digest({**base, "hidden_size": 128})


def test_digest_is_stable_across_processes():
    code = (
        "import torch;from cachedattn.hf.weights import model_digest;torch.manual_seed(0);"
        "net=torch.nn.Sequential(torch.nn.Linear(300,200),torch.nn.Linear(200,10));"
        "print(model_digest({'model_type':'x'}, net))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == model_digest({"model_type": "x"}, _net(0))


def _one_element_changed(net: torch.nn.Module, index: int) -> torch.nn.Module:
    with torch.no_grad():
        net[0].weight.view(-1)[index] += 1e-3
    return net


# First, an element between every-14th-element samples, one past the first 4096 of
# a 60000-element matrix (where evenly spaced samples plus the last do not look), last.
@pytest.mark.parametrize("index", [0, 1, 5, 4097, 59998, 59999])
def test_every_element_is_part_of_the_digest(index):
    assert weights_digest(_net(0)) != weights_digest(_one_element_changed(_net(0), index))


def test_buffers_outside_state_dict_are_part_of_it():
    a, b = _net(0), _net(0)
    for net in (a, b):
        net[0].register_buffer("freq", torch.arange(8.0), persistent=False)
    assert weights_digest(a) == weights_digest(b)
    b[0].freq[3] = 0.5
    assert weights_digest(a) != weights_digest(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.complex64])
def test_tensor_digest_reads_the_values_whatever_the_layout(dtype):
    t = torch.randn(37, 23, generator=torch.Generator().manual_seed(0)) * 10
    t = t > 0 if dtype == torch.bool else t.to(dtype)
    assert tensor_digest(t.t()) == tensor_digest(t.t().contiguous())
    assert tensor_digest(t[::2]) == tensor_digest(t[::2].clone())
    assert tensor_digest(t) != tensor_digest(t.t().contiguous())


def test_tied_tensors_digest_like_equal_copies():
    tied, untied = _net(0), _net(0)
    tied.append(torch.nn.Linear(300, 200))
    untied.append(torch.nn.Linear(300, 200))
    tied[2].weight = tied[0].weight  # the same Parameter under two names
    with torch.no_grad():
        untied[2].weight.copy_(untied[0].weight)
        untied[2].bias.copy_(tied[2].bias)
    assert weights_digest(tied) == weights_digest(untied)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_digest_is_the_same_on_the_gpu(monkeypatch):
    from cachedattn.hf import weights as fingerprint

    monkeypatch.setattr(fingerprint, "_PIECE_BYTES", 1000)  # several pieces, the last one short
    t = torch.randn(123, 45, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert tensor_digest(t.cuda()) == tensor_digest(t)
    assert tensor_digest(t.cuda().t()) == tensor_digest(t.t())
