"""The convolutional and recurrent cases (issues 14 and 15): the CNN's training step, Conv2d alone, the LSTM LM step.

Written like :mod:`benchmarks.cases`: each case makes one numpy state dict
and one batch of data, and builds a :class:`~benchmarks.cases.Side` for mnn,
for PyTorch (the same network in ``torch.nn``, loading that state dict
unchanged) and for the floor (the step's matrix products alone).

Replicas. mnn trains both models in two replicas (:mod:`mnn.parallel`, each
thread a slice of the batch, BLAS on one thread each), as ``mnn train cnn``
and ``mnn train char-rnn`` run, and so do these cases, as the GPT case does.
For the LSTM that changes nothing in the result. For the CNN it does:
BatchNorm normalises each replica's slice with that slice's statistics
(as ``torch.nn.DataParallel`` or DDP without SyncBatchNorm). So that both
frameworks compute the same function (checked by the first-step loss), the
PyTorch side runs its network on the same slices, one after the other,
and takes the mean loss of the concatenated logits. With the environment
variable ``CNN_TORCH_FULL_BATCH=1`` PyTorch runs as its users would write it,
one pass of the whole batch (BatchNorm over all of it, so the first-step
losses then differ slightly and the check warns).
"""

from __future__ import annotations

import os

import numpy

from benchmarks.cases import (Case, Side, floor_side, gemm, linear_gemms, mnn_language_model_side,
                              torch_language_model_side)

# -- the CNN (mnn.models.CNN's defaults, trained by the classifier loop's defaults) -----------------
CNN_BATCH = 128
CNN_ADAMW = {"lr": 2e-3, "weight_decay": 0.01}  # CNNTrainConfig's; betas (0.9, 0.999) on both sides


def conv_gemms(batch: int, c_in: int, c_out: int, size: int, kernel: int = 3, stride: int = 1,
               padding: int = 1, input_grad: bool = True) -> list:
    """The products of a convolution as im2col: ``Y = cols W^T``, ``dW = dY^T cols``, ``dcols = dY W``."""
    out = (size + 2 * padding - kernel) // stride + 1
    rows, depth = batch * out * out, c_in * kernel * kernel
    return linear_gemms(rows, depth, c_out, backward=True, input_grad=input_grad)


class CNNStep(Case):
    """mnn.models.CNN() (conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, fc128, fc10): cross-entropy, AdamW step."""

    name = "cnn_train"

    def __init__(self, batch: int = CNN_BATCH) -> None:
        from mnn.train.classifier import CNNTrainConfig  # noqa: PLC0415

        self.batch = batch
        self.replicas = CNNTrainConfig.replicas  # as the classifier loop runs it
        # 1: PyTorch in one pass of the whole batch (BatchNorm over all of it: the loss differs slightly).
        self.torch_full_batch = os.environ.get("CNN_TORCH_FULL_BATCH") == "1"
        self.description = (f"CNN training step (mnn.models.CNN defaults), batch {batch}, AdamW, "
                            f"{self.replicas} replicas")

    def prepare(self):
        from mnn.models import CNN  # noqa: PLC0415

        model = CNN(seed=0)
        state = {name: numpy.array(value, copy=True) for name, value in model.state_dict().items()}
        rng = numpy.random.default_rng(4)
        data = {"x": rng.standard_normal((self.batch, 1, 28, 28), dtype=numpy.float32),  # normalised pixels
                "y": rng.integers(0, 10, self.batch)}
        return state, data

    def build_mnn(self, state, data):
        from mnn.losses import CrossEntropyLoss  # noqa: PLC0415
        from mnn.models import CNN  # noqa: PLC0415
        from mnn.optim import AdamW, param_groups  # noqa: PLC0415
        from mnn.parallel import DataParallel  # noqa: PLC0415

        model = CNN(seed=0)
        model.load_state_dict(state)
        model.flatten_parameters()  # as ClassifierTask does, before its replicas and optimizer
        parallel = DataParallel(model, CrossEntropyLoss(), self.replicas)  # as ClassifierTask runs it
        optimizer = AdamW(param_groups(model, CNN_ADAMW["weight_decay"]), lr=CNN_ADAMW["lr"])
        x, y = data["x"], data["y"]

        def step():  # the classifier loop's body (no clipping there; the update zeroes the gradients it reads)
            loss = parallel.forward_backward(x, y)
            optimizer.step(zero_grad=True)
            return loss

        return Side(step, float, [model, optimizer, parallel])

    def build_torch(self, state, data):
        import torch  # noqa: PLC0415

        from benchmarks.torch_models import cnn, param_groups  # noqa: PLC0415

        model = cnn()
        model.load_state_dict({k: torch.from_numpy(numpy.array(v, copy=True)) for k, v in state.items()})
        optimizer = torch.optim.AdamW(param_groups(model, CNN_ADAMW["weight_decay"]), lr=CNN_ADAMW["lr"])
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        shards = [x] if self.torch_full_batch else list(torch.tensor_split(x, self.replicas))

        def step():
            logits = torch.cat([model(shard) for shard in shards]) if len(shards) > 1 else model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return Side(step, lambda loss: float(loss.item()), [model, optimizer])

    def build_floor(self, state, data):
        B = self.batch
        return floor_side(conv_gemms(B, 1, 32, 28, input_grad=False) + conv_gemms(B, 32, 64, 14)
                          + linear_gemms(B, 64 * 7 * 7, 128) + linear_gemms(B, 128, 10))


# -- Conv2d alone --------------------------------------------------------------------------------
CONV_SHAPES = {  # name: (batch, in channels, size, out channels, kernel, stride, padding)
    "conv_1x28_32": (128, 1, 28, 32, 3, 1, 1),
    "conv_32x14_64": (128, 32, 14, 64, 3, 1, 1),
    "conv_32x28_64_s2": (128, 32, 28, 64, 3, 2, 1),
}


class ConvStep(Case):
    """Conv2d forward and backward (input and weight gradients), against ``torch.nn.functional.conv2d``.

    The check value is $\\sum y \\odot r$ for a fixed random $r$, whose gradient
    $r$ is what the backward receives on both sides.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.shape = CONV_SHAPES[name]
        B, c_in, size, c_out, k, stride, pad = self.shape
        self.out = (size + 2 * pad - k) // stride + 1
        self.description = (f"Conv2d forward+backward, ({B}, {c_in}, {size}, {size}) -> {c_out} channels, "
                            f"{k}x{k}, stride {stride}, padding {pad}, bias")

    def _layer(self):
        from mnn.layers import Conv2d  # noqa: PLC0415

        _, c_in, _, c_out, k, stride, pad = self.shape
        return Conv2d(c_in, c_out, k, stride=stride, padding=pad, rng=numpy.random.default_rng(5))

    def prepare(self):
        B, c_in, size, c_out, _, _, _ = self.shape
        state = {name: numpy.array(value, copy=True) for name, value in self._layer().state_dict().items()}
        rng = numpy.random.default_rng(6)
        data = {"x": rng.standard_normal((B, c_in, size, size), dtype=numpy.float32),
                "dy": rng.standard_normal((B, c_out, self.out, self.out), dtype=numpy.float32)}
        return state, data

    def build_mnn(self, state, data):
        layer = self._layer()
        layer.load_state_dict(state)
        x, dy = data["x"], data["dy"]

        def step():
            for grad in layer.grads.values():
                grad.fill(0)
            y = layer.forward(x)
            layer.backward(dy)
            return y

        return Side(step, lambda y: float(numpy.vdot(y.astype(numpy.float64), dy)), [layer])

    def build_torch(self, state, data):
        import torch  # noqa: PLC0415

        _, _, _, _, _, stride, pad = self.shape
        weight = torch.from_numpy(state["weight"].copy()).requires_grad_()
        bias = torch.from_numpy(state["bias"].copy()).requires_grad_()
        x = torch.from_numpy(data["x"]).requires_grad_()
        dy = torch.from_numpy(data["dy"])

        def step():
            weight.grad = bias.grad = x.grad = None
            y = torch.nn.functional.conv2d(x, weight, bias, stride=stride, padding=pad)
            y.backward(dy)
            return y

        return Side(step, lambda y: float(numpy.vdot(y.detach().numpy().astype(numpy.float64), data["dy"])),
                    [weight, bias, x])

    def build_floor(self, state, data):
        B, c_in, size, c_out, k, stride, pad = self.shape
        return floor_side(conv_gemms(B, c_in, c_out, size, k, stride, pad))


# -- the LSTM language model (CharRNN, CharRNNTrainConfig's defaults) -----------------------------
LSTM_LM = {"vocab_size": 65, "n_embd": 64, "hidden_size": 256, "num_layers": 2, "cell": "lstm"}
LSTM_T = 64


class LSTMStep(Case):
    """CharRNN (Embedding, 2-layer LSTM 256, Linear head), T 64: cross-entropy, clip 1.0, AdamW, as ``mnn train lstm``."""

    def __init__(self, batch: int) -> None:
        from mnn.train.language_model import CharRNNTrainConfig  # noqa: PLC0415

        self.batch = batch
        self.config = CharRNNTrainConfig
        self.replicas = CharRNNTrainConfig.replicas  # as the language-model loop runs it
        self.name = f"lstm_train_b{batch}"
        self.description = (f"LSTM language model training step (2 x 256, T {LSTM_T}, V 65), batch {batch}, "
                            f"{CharRNNTrainConfig.replicas} replicas")

    def _model(self, state=None):
        from mnn.models import CharRNN  # noqa: PLC0415

        model = CharRNN(**LSTM_LM, seed=0)
        if state is not None:
            model.load_state_dict(state)
        return model

    def prepare(self):
        state = {name: numpy.array(value, copy=True) for name, value in self._model().state_dict().items()}
        tokens = numpy.random.default_rng(7).integers(0, LSTM_LM["vocab_size"], (self.batch, LSTM_T + 1))
        return state, {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}

    def build_mnn(self, state, data):
        c = self.config
        adamw = {"lr": c.learning_rate, "betas": (c.beta1, c.beta2), "weight_decay": c.weight_decay}
        return mnn_language_model_side(self._model(state), c.replicas, adamw, data)  # as LanguageModelTask

    def build_torch(self, state, data):
        import torch  # noqa: PLC0415

        from benchmarks.torch_models import CharRNN, param_groups  # noqa: PLC0415

        c = self.config
        model = CharRNN(LSTM_LM["vocab_size"], LSTM_LM["n_embd"], LSTM_LM["hidden_size"], LSTM_LM["num_layers"])
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.learning_rate,
                                      betas=(c.beta1, c.beta2))
        return torch_language_model_side(model, model, optimizer, data)

    def build_floor(self, state, data):
        B, T, H = self.batch, LSTM_T, LSTM_LM["hidden_size"]
        products = []
        for k in range(LSTM_LM["num_layers"]):
            n_in = LSTM_LM["n_embd"] if k == 0 else H
            products += linear_gemms(T * B, n_in, 4 * H)  # input projections, dW_ih, dX (the embedding's too)
            products += [gemm(B, H, 4 * H) for _ in range(T)]  # h_{t-1} W_hh^T, per step
            products += [gemm(B, 4 * H, H) for _ in range(T)]  # dL/da_t W_hh, per step
            products.append(gemm(4 * H, T * B, H, transpose_a=True))  # dW_hh
        products += linear_gemms(T * B, H, LSTM_LM["vocab_size"])
        return floor_side(products)


def conv_rnn_cases() -> list[Case]:
    return [CNNStep(), *(ConvStep(name) for name in CONV_SHAPES), LSTMStep(12), LSTMStep(32)]
