"""Every layer, by family as in ``torch.nn.modules``: ``from mnn.layers import Linear, GELU, LayerNorm``.

Read them in this order: ``linear`` (the exemplar), ``activation`` (and ``gelu``, ``prelu``),
``softmax``, ``dropout``, ``matmul``, ``embedding``, ``normalization``,
``attention``, ``rnn`` (then ``input_projection``, ``elman``, ``lstm``, ``gru``). Each file holds a family's
layers with their compiled loops (:mod:`mnn.jit`) beside them.
"""

from mnn.layers.activation import ELU, LeakyReLU, Log, ReLU, Sigmoid, SiLU, Tanh
from mnn.layers.attention import MultiHeadAttention
from mnn.layers.batchnorm import BatchNorm1d, BatchNorm2d
from mnn.layers.conv import Conv2d
from mnn.layers.dropout import Dropout
from mnn.layers.embedding import Embedding
from mnn.layers.flatten import Flatten
from mnn.layers.gelu import GELU
from mnn.layers.gru import GRU
from mnn.layers.linear import Linear
from mnn.layers.lstm import LSTM
from mnn.layers.matmul import MatrixProduct
from mnn.layers.normalization import LayerNorm
from mnn.layers.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from mnn.layers.prelu import PReLU
from mnn.layers.elman import RNN
from mnn.layers.softmax import LogSoftmax, Softmax

__all__ = ["ELU", "GELU", "GRU", "LSTM", "RNN", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm1d",
           "BatchNorm2d", "Conv2d", "Dropout", "Embedding", "Flatten", "LayerNorm", "LeakyReLU", "Linear",
           "Log", "LogSoftmax", "MatrixProduct", "MaxPool2d", "MultiHeadAttention", "PReLU", "ReLU", "SiLU",
           "Sigmoid", "Softmax", "Tanh"]
