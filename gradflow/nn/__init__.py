"""Neural-network building blocks: Module, Parameter, layers, init and losses."""

from . import functional, init
from ._layers import (
    GELU, Dropout, Flatten, Identity, LeakyReLU, Linear, LogSoftmax, ModuleDict,
    ModuleList, ReLU, Sequential, Sigmoid, SiLU, Softmax, Softplus, Tanh,
)
from ._loss import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss
from ._module import Module, Parameter
from ._attention import MultiheadAttention
from ._rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from ._transformer import TransformerEncoder, TransformerEncoderLayer
from ._conv import Conv1d, Conv2d
from ._embedding import Embedding
from ._norm import BatchNorm1d, BatchNorm2d, LayerNorm
from ._pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from . import utils
