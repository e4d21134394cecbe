"""fairseq language models around the core's one-hot recurrent models, for the RTRL estimators.

``tanh_rnn_lm`` wraps :class:`atbptt.estimators.TanhRnn` (the model KF-RTRL is built for) and
``elementwise_lstm_lm`` wraps :class:`atbptt.estimators.ElementwiseLstm` (the model exact RTRL is
built for), with the vocabulary of the task's dictionary and ``--hidden-size`` units. The maths is
the core model's: the wrapper only translates between fairseq's and the core's interfaces.

State layout. The task, its criterion and its checkpoints keep a recurrent state as a tuple of
tensors with the batch along dim 1 (``nn.LSTM``'s layers x B x H: the checkpoint's columns are
sliced and gathered there). The core models' states are B x H. The wrapper therefore shows every
state as 1 x B x H (one layer) and converts at its boundary, so fixed and adaptive TBPTT, the bias
estimate, evaluation streams and checkpoints treat these models exactly as the LSTM. The gradient
estimators get the core model itself (``gradient_estimation_model()``): KF-RTRL and exact RTRL are
defined on the core classes and read their weights directly, and ARTBP and UORO then compute what
they compute in the plain-PyTorch driver. (The task turns the estimators' B x H carried state into
its layout once, in ``task_layout``; their own carry is checkpointed as it is.)
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model
from torch import Tensor

from atbptt.estimators import ElementwiseLstm, TanhRnn
from atbptt_fairseq.models.stateful import (
    State,
    StatefulDecoder,
    StatefulLanguageModel,
    register_sized_model,
)


@dataclass
class OneHotRecurrentLmConfig(FairseqDataclass):
    hidden_size: int = field(default=128, metadata={"help": "recurrent units (one layer)"})


def to_core(state: State) -> State:
    """1 x B x H (the task's layout) -> B x H (the core model's)."""
    return tuple(tensor.squeeze(0) for tensor in state)


def from_core(state: State) -> State:
    """B x H (the core model's layout) -> 1 x B x H (the task's)."""
    return tuple(tensor.unsqueeze(0) for tensor in state)


class OneHotRecurrentDecoder(StatefulDecoder):
    """A core one-hot recurrent model behind the stateful decoder interface (the ``forward``
    options of :class:`~atbptt_fairseq.models.tbptt_lstm_lm.TbpttLstmDecoder`)."""

    def __init__(self, recurrence: torch.nn.Module, dictionary) -> None:
        super().__init__(dictionary)
        self.recurrence = recurrence

    def zero_state(self, batch_size: int) -> State:
        return from_core(self.recurrence.zero_state(batch_size))

    def forward(
        self,
        prev_output_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        state: Optional[State] = None,
        carry_offset: Optional[int] = None,
        output_start: int = 0,
        stream: Optional[str] = None,
        start_of_stream: bool = False,
        **unused,
    ) -> Tuple[Tensor, Dict[str, object]]:
        """Logits of positions ``output_start..T-1`` of ``prev_output_tokens`` (B x T) read from
        ``state``; ``extra["carried_state"]`` is the detached state after ``carry_offset`` steps
        (default: all), ``extra["state"]`` the final one. ``stream``: carry the state inside the
        model under this key (evaluation), as the LSTM decoder does."""
        batch_size, length = prev_output_tokens.shape
        state = self.initial_state(batch_size, state, stream, start_of_stream)
        carry_offset = length if carry_offset is None else carry_offset
        core_state = to_core(state)
        if 0 < carry_offset < length:  # the overlap window: the carried state lies inside it
            head, carried = self.recurrence.run_window(
                prev_output_tokens[:, :carry_offset],
                core_state,
                min(output_start, carry_offset),
                carry_offset,
            )
            tail, final = self.recurrence.run_window(
                prev_output_tokens[:, carry_offset:],
                carried,
                max(output_start - carry_offset, 0),
                length - carry_offset,
            )
            logits = torch.cat([head, tail], dim=1)
        else:
            logits, final = self.recurrence.run_window(
                prev_output_tokens, core_state, output_start, length
            )
            carried = core_state if carry_offset == 0 else final
        final, carried = from_core(final), from_core(carried)
        self.remember(stream, final)
        return logits, {
            "state": final,
            "carried_state": tuple(tensor.detach() for tensor in carried),
        }


class OneHotRecurrentLanguageModel(StatefulLanguageModel):
    """A core one-hot recurrent model as a stateful fairseq language model.

    Satisfies :class:`atbptt.protocol.RecurrentModel` with 1 x B x H states (see the module's
    docstring); ``core_class`` is the wrapped model's class.
    """

    core_class: type = TanhRnn
    vocabulary_parameter = "decoder.recurrence.output.weight"

    @classmethod
    def build_model(cls, cfg: OneHotRecurrentLmConfig, task) -> "OneHotRecurrentLanguageModel":
        dictionary = task.target_dictionary
        recurrence = cls.core_class(len(dictionary), cfg.hidden_size)
        return cls(OneHotRecurrentDecoder(recurrence, dictionary))

    def gradient_estimation_model(self) -> torch.nn.Module:
        """The core model (B x H states), which ``--gradient-estimator`` methods train: KF-RTRL and
        exact RTRL need it by type; its parameters are this model's."""
        return self.decoder.recurrence

    def advance(self, tokens: Tensor, state: State) -> State:
        return from_core(self.decoder.recurrence.advance(tokens, to_core(state)))

    def readout(self, state: State) -> Tensor:
        return self.decoder.recurrence.readout(to_core(state))


@register_model("tanh_rnn_lm", dataclass=OneHotRecurrentLmConfig)
class TanhRnnLanguageModel(OneHotRecurrentLanguageModel):
    """``h_t = tanh(W [onehot(x_t); h_{t-1}] + b)`` (:class:`atbptt.estimators.TanhRnn`): trains
    with every ``--gradient-estimator`` but exact-rtrl."""

    core_class = TanhRnn


@register_model("elementwise_lstm_lm", dataclass=OneHotRecurrentLmConfig)
class ElementwiseLstmLanguageModel(OneHotRecurrentLanguageModel):
    """The element-wise recurrent LSTM (:class:`atbptt.estimators.ElementwiseLstm`): trains with
    every ``--gradient-estimator`` but kf-rtrl."""

    core_class = ElementwiseLstm


# copy task: one layer of 64 units, a state about the size of the paper's 2 x 50 LSTM's, where
# KF-RTRL's H^3 per step and exact RTRL's 3 (V + 2) x H sensitivities per column stay cheap
TanhRnnCopy = register_sized_model(
    TanhRnnLanguageModel,
    OneHotRecurrentLmConfig,
    "tanh_rnn_copy",
    "A tanh RNN of 64 units for the copy task.",
    hidden_size=64,
)
ElementwiseLstmCopy = register_sized_model(
    ElementwiseLstmLanguageModel,
    OneHotRecurrentLmConfig,
    "elementwise_lstm_copy",
    "An element-wise LSTM of 64 units for the copy task.",
    hidden_size=64,
)
TanhRnnLmTiny = register_sized_model(
    TanhRnnLanguageModel,
    OneHotRecurrentLmConfig,
    "tanh_rnn_lm_tiny",
    "A tanh RNN of 8 units, for tests.",
    hidden_size=8,
)
ElementwiseLstmLmTiny = register_sized_model(
    ElementwiseLstmLanguageModel,
    OneHotRecurrentLmConfig,
    "elementwise_lstm_lm_tiny",
    "An element-wise LSTM of 8 units, for tests.",
    hidden_size=8,
)
