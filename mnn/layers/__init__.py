"""Every layer, by family as in ``torch.nn.modules``: ``from mnn.layers import Linear, GELU, LayerNorm``.

Read them in this order: ``linear`` (the exemplar), ``activation``,
``softmax``, ``dropout``, ``matmul``, ``embedding``, ``normalization``,
``attention``, ``rnn`` (then ``lstm``, ``gru``). Each file holds a family's
layers with their compiled loops (:mod:`mnn.jit`) beside them.
"""

from mnn.layers.activation import GELU, Log, ReLU, Sigmoid, Tanh
from mnn.layers.attention import MultiHeadAttention
from mnn.layers.dropout import Dropout
from mnn.layers.embedding import Embedding
from mnn.layers.gru import GRU
from mnn.layers.linear import Linear
from mnn.layers.lstm import LSTM
from mnn.layers.matmul import MatrixProduct
from mnn.layers.normalization import LayerNorm
from mnn.layers.rnn import RNN
from mnn.layers.softmax import LogSoftmax, Softmax

__all__ = ["GELU", "GRU", "LSTM", "RNN", "Dropout", "Embedding", "LayerNorm", "Linear", "Log", "LogSoftmax",
           "MatrixProduct", "MultiHeadAttention", "ReLU", "Sigmoid", "Softmax", "Tanh"]
