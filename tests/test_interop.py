"""PyTorch interop: an mnn GPT exported as safetensors runs in a nanoGPT-style torch model with the same logits,
and a torch state dict (float32, float16, bfloat16) imports into mnn."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn, F = torch.nn, torch.nn.functional

from mnn.errors import CheckpointError  # noqa: E402
from mnn.models.gpt import GPT, GPTConfig  # noqa: E402
from mnn.io import export_gpt, import_gpt, save_model  # noqa: E402

CONFIG = GPTConfig(block_size=12, vocab_size=19, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)


# -- a nanoGPT-style model, written here in torch (same module names and layout) -------
class SelfAttention(nn.Module):
    def __init__(self, c, mask_buffer):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        if mask_buffer:  # nanoGPT without flash attention keeps the causal mask as a buffer
            self.register_buffer("bias", torch.tril(torch.ones(c.block_size, c.block_size))
                                 .view(1, 1, c.block_size, c.block_size))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # mnn's GELU is GPT-2's tanh form


class Block(nn.Module):
    def __init__(self, c, mask_buffer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = SelfAttention(c, mask_buffer)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = FeedForward(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, c, mask_buffer=False):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList(Block(c, mask_buffer) for _ in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():  # non-trivial LayerNorm and bias values
            if p.ndim == 1:
                nn.init.normal_(p, 0.0 if name.endswith("bias") else 1.0, 0.1)

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def ids(seed=0, B=3, T=CONFIG.block_size):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (B, T))


def mnn_logits(model, idx):
    model.eval()
    logits = model.forward(idx)
    model.release_caches()
    return logits


def torch_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).numpy()


def assert_close(got, want, rel=1e-5):
    error = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    assert error <= rel, f"relative error {error:.2e} > {rel:.0e}"


def torch_state_file(tmp_path, model, dtype=torch.float32, drop=(), prefix=""):
    state = {prefix + k: v.detach().to(dtype if v.is_floating_point() and not k.endswith(".attn.bias") else v.dtype)
             .clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    path = tmp_path / "torch.safetensors"
    safetensors_torch.save_file(state, str(path))
    return path


def test_export_gpt_loads_into_torch_with_the_same_logits(tmp_path):
    model = GPT(CONFIG, seed=3)
    for name, param in model.named_parameters():  # make LayerNorms and biases non-trivial too
        if param.ndim == 1:
            param += np.random.default_rng(len(name)).normal(0, 0.1, param.shape).astype(param.dtype)
    path = export_gpt(model, tmp_path / "gpt.safetensors")
    state = safetensors_torch.load_file(str(path))
    assert state["lm_head.weight"].dtype == torch.float32
    reference = TorchGPT(CONFIG)
    reference.load_state_dict(state, strict=True)
    idx = ids()
    assert_close(mnn_logits(model, idx), torch_logits(reference, idx))
    # and from the weights file alone
    save_model(tmp_path / "model.safetensors", model)
    export_gpt(tmp_path / "model.safetensors", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("mask_buffer", [False, True])
def test_import_a_torch_state_dict_float32(tmp_path, mask_buffer):
    torch.manual_seed(0)
    reference = TorchGPT(CONFIG, mask_buffer=mask_buffer)
    path = torch_state_file(tmp_path, reference)
    model = import_gpt(path, n_head=CONFIG.n_head)
    assert model.config == CONFIG
    assert model.lm_head.params["weight"] is model.transformer.wte.params["weight"]
    idx = ids(1)
    assert_close(mnn_logits(model, idx), torch_logits(reference, idx))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_import_half_precision_state_dicts(tmp_path, dtype):
    torch.manual_seed(1)
    reference = TorchGPT(CONFIG)
    path = torch_state_file(tmp_path, reference, dtype=dtype)
    with torch.no_grad():  # the reference runs on exactly the rounded weights, in float32
        for p in reference.parameters():
            p.copy_(p.to(dtype).float())
    model = import_gpt(path, n_head=CONFIG.n_head)
    assert model.transformer.wte.params["weight"].dtype == np.float32
    idx = ids(2)
    assert_close(mnn_logits(model, idx), torch_logits(reference, idx))


def test_bf16_is_decoded_exactly(tmp_path):
    values = torch.tensor([1.0, -2.5, 3.140625, 1e-30, 6e30, 0.0], dtype=torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file({"x": values}, str(path))
    from mnn.io import read_tensors

    tensors, _ = read_tensors(path)
    assert tensors["x"].dtype == np.float32
    assert np.array_equal(tensors["x"], values.float().numpy())


def test_import_handles_one_tied_name_compile_prefix_and_refuses_untied_heads(tmp_path):
    torch.manual_seed(2)
    reference = TorchGPT(CONFIG)
    idx = ids(3)
    want = torch_logits(reference, idx)
    for drop in (["transformer.wte.weight"], ["lm_head.weight"]):
        model = import_gpt(torch_state_file(tmp_path, reference, drop=drop, prefix="_orig_mod."), n_head=2)
        assert_close(mnn_logits(model, idx), want)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["lm_head.weight"] += 1.0
    safetensors_torch.save_file(state, str(tmp_path / "untied.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from transformer.wte.weight"):
        import_gpt(tmp_path / "untied.safetensors", n_head=2)
    with pytest.raises(CheckpointError, match="n_head cannot be read from the weights"):
        import_gpt(torch_state_file(tmp_path, reference))
    with pytest.raises(CheckpointError, match="n_embd 16 is not divisible by n_head 3"):
        import_gpt(torch_state_file(tmp_path, reference), n_head=3)
    safetensors_torch.save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a nanoGPT GPT"):
        import_gpt(tmp_path / "other.safetensors", n_head=2)


def test_export_then_import_round_trips_exactly(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=4, n_embd=8, bias=False), seed=4)
    back = import_gpt(export_gpt(model, tmp_path / "gpt.safetensors"))  # n_head from the file's config
    assert back.config == model.config and math.isfinite(float(mnn_logits(back, ids()[:, :8] % 11).sum()))
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert np.array_equal(a, b), name


def test_the_safetensors_library_reads_every_file_mnn_writes(tmp_path):
    """mnn writes the bytes itself (deterministic metadata order); the reference reader must agree."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    from mnn.io import read_tensors, save_tensors

    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "step": np.array(7, dtype=np.int64), "half": rng.standard_normal(6).astype(np.float16),
               "c.bias": rng.standard_normal(2)}
    path = save_tensors(tmp_path / "x.safetensors", tensors, {"format": "pt", "config": {"n": 1}})
    theirs = safetensors_numpy.load_file(str(path))
    ours, metadata = read_tensors(path)
    assert set(theirs) == set(tensors) == set(ours)
    for name, array in tensors.items():
        assert theirs[name].dtype == array.dtype and theirs[name].shape == array.shape
        np.testing.assert_array_equal(theirs[name], array)
        np.testing.assert_array_equal(ours[name], array)
    with safe_open(str(path), framework="np") as file:
        assert file.metadata()["config"] == '{"n": 1}' == metadata["config"]
    assert path.read_bytes() == save_tensors(tmp_path / "y.safetensors", tensors,
                                             {"format": "pt", "config": {"n": 1}}).read_bytes()
