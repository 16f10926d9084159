"""Model accounting (mnn.summary) checked two ways: its FLOPs against PyTorch's FlopCounterMode on twin models,
and its memory against the peak tracemalloc measures over a real training step."""

from __future__ import annotations

import gc
import json
import math
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import torch_models
from mnn.layers import GRU, LSTM, RNN, Conv2d, Linear, MatrixProduct
from mnn.losses import CrossEntropyLoss
from mnn.models import CNN, GPT, MLP, CharRNN, GPTConfig
from mnn.optim import AdamW
from mnn.summary import readable_bytes, summary

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # mkldnn.flags

GPT_CPU = {"block_size": 64, "vocab_size": 65, "n_layer": 4, "n_head": 4, "n_embd": 128, "bias": False}


def torch_flops(model, x, state=()):
    """FlopCounterMode's count of one forward and of the backward of ``sum(output)``."""
    with FlopCounterMode(display=False) as counter:
        out = model(x, *state)
        out = out[0] if isinstance(out, tuple) else out
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    return forward, counter.get_total_flops()


class ExplicitAttention(torch_models.CausalSelfAttention):
    """nanoGPT's attention with the products written out: FlopCounterMode does not count the CPU kernel of
    ``scaled_dot_product_attention`` (it saw 100,663,296 fewer forward FLOPs on the GPT CPU recipe)."""

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(self.n_embd, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = F.softmax(scores, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), None


class StepByStepLSTM(torch.nn.Module):
    """``torch.nn.LSTM`` (batch first) written as its products: the input projection of all steps, then one
    ``h W_hh^T`` per step. On the CPU ``nn.LSTM`` runs as one oneDNN operation that FlopCounterMode does not
    count (it saw only the head's products)."""

    def __init__(self, lstm: torch.nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0, c0):
        for k in range(self.lstm.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self.lstm, f"{name}_l{k}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            projected = x @ w_ih.T + (b_ih + b_hh)
            h, c, outputs = h0[k], c0[k], []
            for t in range(x.shape[1]):
                i, f, g, o = (projected[:, t] + h @ w_hh.T).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return x


class TorchCharRNN(torch.nn.Module):
    def __init__(self, vocab_size, n_embd, hidden_size, num_layers) -> None:
        super().__init__()
        twin = torch_models.CharRNN(vocab_size, n_embd, hidden_size, num_layers)
        self.wte, self.rnn, self.head = twin.wte, StepByStepLSTM(twin.rnn), twin.head

    def forward(self, idx, h0, c0):
        return self.head(self.rnn(self.wte(idx), h0, c0))


def test_mlp_flops_equal_flop_counter_mode():
    mlp = MLP(784, (256,), 10)
    result = summary(mlp, (64, 784))
    twin = torch_models.mlp(784, 256, 10)
    assert (result.forward_flops, result.backward_flops) == torch_flops(twin, torch.zeros(64, 784))
    assert (result.forward_flops, result.backward_flops) == (26_017_792, 26_345_472)  # first layer: no dX
    assert result.parameters == sum(p.numel() for p in twin.parameters()) == mlp.num_parameters()


def test_gpt_flops_equal_flop_counter_mode():
    gpt = GPT(GPTConfig(**GPT_CPU))
    result = gpt.summary((12, 64))
    twin = torch_models.GPT(SimpleNamespace(**GPT_CPU))
    for block in twin.transformer.h:
        block.attn.__class__ = ExplicitAttention
    assert (result.forward_flops, result.backward_flops) == torch_flops(twin, torch.zeros(12, 64, dtype=torch.long))
    assert (result.forward_flops, result.backward_flops) == (1_321_402_368, 2_642_804_736)  # ../shared/HINTS.md
    assert result.parameters == gpt.num_parameters()  # the tied lm_head counted once
    assert [row.note for row in result.rows if row.name == "lm_head"] == ["weight tied"]


def test_cnn_flops_equal_flop_counter_mode():
    result = summary(CNN(), (32, 1, 28, 28))
    twin = torch_models.cnn()
    assert (result.forward_flops, result.backward_flops) == torch_flops(twin, torch.zeros(32, 1, 28, 28))
    first = result.rows[0]
    assert first.kind == "Conv2d" and first.backward_flops == first.forward_flops  # input_grad=False: dW only


def test_lstm_flops_equal_flop_counter_mode():
    """The per-step products of the LSTM; the initial state is a leaf that needs its gradient, as mnn's backward
    returns it (torch skips the product for an initial state it does not differentiate)."""
    model = CharRNN(65, 64, 256, 2)
    result = summary(model, (12, 64))
    twin = TorchCharRNN(65, 64, 256, 2)
    state = [torch.zeros(2, 12, 256, requires_grad=True) for _ in range(2)]
    counted = torch_flops(twin, torch.zeros(12, 64, dtype=torch.long), state)
    assert (result.forward_flops, result.backward_flops) == counted == (1_334_181_888, 2_668_363_776)
    fused = torch_models.CharRNN(65, 64, 256, 2)
    assert torch_flops(fused, torch.zeros(12, 64, dtype=torch.long))[0] == 2 * 12 * 64 * 256 * 65  # head only
    rnn = summary(model.rnn, (12, 64, 64))
    with torch.backends.mkldnn.flags(enabled=False):  # ATen's own step loop: the same products
        assert torch_flops(fused.rnn, torch.zeros(12, 64, 64, requires_grad=True), ((state[0], state[1]),)) == \
            (rnn.forward_flops, rnn.backward_flops)


@pytest.mark.parametrize("cell, torch_cell", [(GRU, torch.nn.GRU), (RNN, torch.nn.RNN)])
def test_gru_and_rnn_flops_equal_torch_step_loop(cell, torch_cell):
    layer = cell(16, 32, num_layers=2, batch_first=True)
    result = summary(layer, (3, 5, 16))
    twin = torch_cell(16, 32, num_layers=2, batch_first=True)
    h0 = torch.zeros(2, 3, 32, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=False):
        x = torch.zeros(3, 5, 16, requires_grad=True)  # mnn returns dX and dh0: the same products
        assert (result.forward_flops, result.backward_flops) == torch_flops(twin, x, (h0,))


def test_layer_counts_are_the_docstrings():
    assert Linear(5, 7).flops((2, 3, 5)) == (2 * 6 * 5 * 7, 4 * 6 * 5 * 7)
    assert Linear(5, 7, input_grad=False).flops((6, 5)) == (2 * 6 * 5 * 7, 2 * 6 * 5 * 7)
    assert MatrixProduct().flops((2, 3, 4, 5), (2, 3, 5, 6)) == (2 * 6 * 4 * 5 * 6, 4 * 6 * 4 * 5 * 6)
    conv = Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    M = 2 * 5 * 5  # N * H_o * W_o for a 9x9 input
    assert conv.flops((2, 4, 9, 9)) == (2 * M * 9 * 2 * 8, 4 * M * 9 * 2 * 8)
    T, B, n, H = 7, 3, 10, 6
    assert LSTM(n, H).flops((T, B, n)) == (2 * T * B * 4 * H * (n + H), 4 * T * B * 4 * H * (n + H))
    two = LSTM(n, H, num_layers=2, bidirectional=True, batch_first=True)
    per_direction = 2 * T * B * 4 * H * (n + H) + 2 * T * B * 4 * H * (2 * H + H)
    assert two.flops((B, T, n)) == (2 * per_direction, 4 * per_direction)


def measured_peak(build, shape, ids: bool, classes: int) -> int:
    """tracemalloc's peak over building the model and AdamW and one training step (numpy reports its arrays)."""

    def step():
        rng = np.random.default_rng(0)
        x = rng.integers(0, classes, shape) if ids else rng.standard_normal(shape, dtype=np.float32)
        y = rng.integers(0, classes, shape if ids else shape[:1])
        model = build()
        optimizer, loss_fn = AdamW(model, lr=1e-3), CrossEntropyLoss()
        optimizer.zero_grad()
        logits = model.forward(x)
        loss_fn.forward(logits, y)
        del logits
        model.backward(loss_fn.backward())
        optimizer.step()

    step()  # compiles the kernels (numba's own allocations are not the model's)
    gc.collect()
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name, build, shape, ids, classes", [
    ("mlp", lambda: MLP(784, (256,), 10), (64, 784), False, 10),
    ("gpt", lambda: GPT(GPTConfig(**GPT_CPU)), (12, 64), True, 65),
    ("cnn", lambda: CNN(), (32, 1, 28, 28), False, 10),
    ("lstm", lambda: CharRNN(65, 64, 256, 2), (12, 64), True, 65),
])
def test_memory_agrees_with_tracemalloc_within_15_percent(name, build, shape, ids, classes):
    result = summary(build(), shape)
    peak = measured_peak(build, shape, ids, classes)
    assert abs(peak / result.peak_bytes - 1) <= 0.15, (name, peak, result.peak_bytes)
    assert result.training_bytes <= result.peak_bytes <= peak * 1.15


def test_summary_leaves_the_model_untouched():
    model = CharRNN(65, 16, 32, 1, dropout=0.2)
    before = model.drop.rng.bit_generator.state
    summary(model, (2, 5))
    assert model.drop.rng.bit_generator.state == before
    assert all(module.cache is None for _, module in model.named_modules())


def test_json_and_table():
    result = summary(GPT(GPTConfig(**GPT_CPU)), (2, 8))
    data = json.loads(result.to_json())
    for key in ("parameters", "forward_flops", "backward_flops", "cached_bytes"):
        assert isinstance(data[key], int) and data[key] > 0
    assert data["forward_flops"] == sum(row["forward_flops"] for row in data["layers"])
    assert data["cached_bytes"] == sum(row["cached_bytes"] for row in data["layers"])
    table = result.table()
    assert "transformer.h.0.attn.c_attn (Linear)" in table and f"{result.forward_flops:,}" in table
    assert readable_bytes(1536) == "1.5 KiB" and readable_bytes(12) == "12 B"


def test_cli_summary_of_a_preset_and_of_a_saved_model(tmp_path, capsys):
    from mnn.cli import main
    from mnn.io import save_model

    assert main(["summary", "--model", "gpt", "--preset", "shakespeare-char-cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_shape"] == [12, 64]
    assert (data["forward_flops"], data["backward_flops"]) == (1_321_402_368, 2_642_804_736)
    assert data["parameters"] == 804_096 and data["cached_bytes"] > 0
    save_model(tmp_path / "model.safetensors", CharRNN(65, 16, 32, 1), vocab="abc")
    assert main(["summary", str(tmp_path), "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("CharRNN, batch (4, 64), int64") and "rnn (LSTM)" in table
    assert main(["summary", str(tmp_path), "--preset", "default"]) == 2
    assert "--preset goes with --model" in capsys.readouterr().err
    assert main(["summary", "--model", "cnn", "--preset", "nope"]) == 2
    assert "cnn has the presets default, fashion-best" in capsys.readouterr().err


def test_mfu_figures_and_the_probe(tmp_path, monkeypatch):
    from mnn import throughput

    monkeypatch.setenv("MNN_PEAK_GFLOPS", "100")
    assert throughput.achieved(2e9, 10.0) == (200.0, 2.0)  # 2 GFLOP in 10 ms: 200 GFLOP/s, twice a 100 peak
    assert throughput.speed(12.34) == "12.3 ms/step"  # no task: no FLOPs to divide
    task = type("Task", (), {"model": MLP(784, (256,), 10), "x_train": np.zeros((5, 784), dtype=np.float32),
                             "config": SimpleNamespace(batch_size=64, grad_accum=2)})()
    assert throughput.task_step_flops(task) == 2 * (26_017_792 + 26_345_472)  # two micro-batches of 64 a step
    assert throughput.speed(0.0, task) == "0.0 ms/step"  # nothing timed yet: no probe, no figure
    assert throughput.speed(10.0, task) == "10.0 ms/step | 10 GFLOP/s | MFU 10%"
    monkeypatch.delenv("MNN_PEAK_GFLOPS")
    monkeypatch.setenv("MNN_CACHE", str(tmp_path))
    monkeypatch.setattr(throughput, "_peaks", {})
    rates = throughput.measure_sgemm(size=64, repeats=3)
    assert rates["gflops"] >= rates["median_gflops"] > 0
    measured = []
    rates = {"gflops": 321.0, "median_gflops": 300.0}
    monkeypatch.setattr(throughput, "measure_sgemm", lambda: measured.append(1) or rates)
    assert throughput.peak_gflops() == 321.0 and throughput.peak_gflops() == 321.0 and measured == [1]
    monkeypatch.setattr(throughput, "_peaks", {})  # a new process reads the cache file: no second measurement
    assert throughput.peak_gflops() == 321.0 and measured == [1]
    entry = json.loads((tmp_path / "peak_sgemm.json").read_text())[throughput.machine_key()]
    assert (entry["gflops"], entry["median_gflops"], entry["size"]) == (321.0, 300.0, 2048)


def test_a_step_faster_than_the_kept_peak_measures_the_peak_again(tmp_path, monkeypatch):
    from mnn import throughput

    monkeypatch.delenv("MNN_PEAK_GFLOPS", raising=False)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path))
    monkeypatch.setattr(throughput, "_peaks", {throughput.machine_key(): 100.0})  # taken on busy cores
    runs = iter([{"gflops": 150.0, "median_gflops": 140.0}, {"gflops": 400.0, "median_gflops": 390.0}])
    measured = []
    monkeypatch.setattr(throughput, "measure_sgemm", lambda: measured.append(1) or next(runs))
    assert throughput.achieved(2e9, 10.0) == (200.0, 200.0 / 150.0)  # measured again: 150, kept, still busy
    assert throughput.achieved(2e9, 10.0) == (200.0, 0.5) and len(measured) == 2  # again: 400 GFLOP/s
    assert throughput.achieved(2e9, 10.0) == (200.0, 0.5) and len(measured) == 2  # under the peak: no probe
    entry = json.loads((tmp_path / "peak_sgemm.json").read_text())[throughput.machine_key()]
    assert entry["gflops"] == 400.0  # the next process starts from the faster peak
    monkeypatch.setattr(throughput, "measure_sgemm", lambda: {"gflops": 300.0, "median_gflops": 290.0})
    assert throughput.remeasure_peak(400.0) == 400.0  # a slower new measurement never lowers the peak
