import subprocess
import sys

import torch

from cachedattn.store.fingerprint import config_digest, model_digest, weights_digest


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


def test_full_digest_sees_every_weight():
    a, b = _net(0), _net(0)
    with torch.no_grad():
        b[0].weight[123, 77] += 1.0
    assert weights_digest(a, sample=None) != weights_digest(b, sample=None)


def test_config_digest_ignores_provenance():
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    assert config_digest(base) == config_digest({**base, "_name_or_path": "/somewhere/else"})
    assert config_digest(base) != config_digest({**base, "hidden_size": 128})


def test_digest_is_stable_across_processes():
    code = (
        "import torch;from cachedattn.store.fingerprint import model_digest;torch.manual_seed(0);"
        "net=torch.nn.Sequential(torch.nn.Linear(300,200),torch.nn.Linear(200,10));"
        "print(model_digest({'model_type':'x'}, net))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == model_digest({"model_type": "x"}, _net(0))
