"""What the project's fairseq language models share.

The recurrent state is an explicit input and output of ``forward`` so that the task can carry it
across segments; evaluation streams (validation, ``fairseq-eval-lm``) carry their own state inside
the model, keyed by stream name, because fairseq's scorer calls ``model(**net_input)`` and keeps
nothing between batches. States are tuples of tensors with the batch along dim 1.
"""

from dataclasses import field, fields, make_dataclass
from typing import Dict, Optional, Tuple

from fairseq.models import FairseqDecoder, FairseqLanguageModel, register_model
from torch import Tensor

from atbptt_fairseq.errors import UserInputError

State = Tuple[Tensor, ...]  # every tensor layers x B x H


class StatefulDecoder(FairseqDecoder):
    """A decoder that keeps one recurrent state per evaluation stream."""

    def __init__(self, dictionary) -> None:
        super().__init__(dictionary)
        self._stream_states: Dict[str, State] = {}

    def zero_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def initial_state(
        self,
        batch_size: int,
        state: Optional[State],
        stream: Optional[str],
        start_of_stream: bool,
    ) -> State:
        """``state``; with a ``stream``, that stream's last state instead, zero at its start or
        when the batch size changed."""
        if stream is not None:
            state = None if start_of_stream else self._stream_states.get(stream)
            if state is not None and state[0].size(1) != batch_size:
                state = None
        return self.zero_state(batch_size) if state is None else state

    def remember(self, stream: Optional[str], final: State) -> None:
        """Keep ``final`` (detached) as the stream's state for its next block."""
        if stream is not None:
            self._stream_states[stream] = tuple(tensor.detach() for tensor in final)

    def reset_streams(self) -> None:
        self._stream_states.clear()

    def max_positions(self) -> int:
        return int(1e9)


class StatefulLanguageModel(FairseqLanguageModel):
    """The window interface the task calls (:class:`atbptt.protocol.RecurrentModel` adds
    ``advance`` and ``readout``, which subclasses define) and a checked checkpoint load."""

    state_batch_dim = 1  # every state tensor is layers x B x H, as nn.LSTM's
    vocabulary_parameter: str  # a parameter whose first dimension is the dictionary's size

    def zero_state(self, batch_size: int) -> State:
        return self.decoder.zero_state(batch_size)

    def run_window(
        self, tokens: Tensor, state: State, output_start: int, carry_offset: int
    ) -> Tuple[Tensor, State]:
        """Logits from ``output_start`` on and the (detached) state after ``carry_offset`` steps."""
        logits, extra = self.decoder(
            tokens, state=state, carry_offset=carry_offset, output_start=output_start
        )
        return logits, extra["carried_state"]

    def reset_streams(self) -> None:
        self.decoder.reset_streams()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's loading, after a check that the checkpoint fits this model and dictionary."""
        check_checkpoint_fits(self.state_dict(), state_dict, self.vocabulary_parameter)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def check_checkpoint_fits(
    own: Dict[str, Tensor], saved: Dict[str, Tensor], vocabulary: str
) -> None:
    """Refuse, in one line, checkpoint parameters that do not fit a model: another dictionary
    (the ``vocabulary`` parameter's first dimension differs) or other sizes."""
    if vocabulary in saved and saved[vocabulary].size(0) != own[vocabulary].size(0):
        raise UserInputError(
            f"the checkpoint was trained with a dictionary of {saved[vocabulary].size(0)} "
            f"types but this data directory's dict.txt has {own[vocabulary].size(0)}: evaluate "
            "or resume with the data directory (dict.txt) it was trained on, or binarize your "
            "text with fairseq-preprocess --srcdict <that dict.txt>"
        )
    mismatched = [
        f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
        for name, tensor in saved.items()
        if name in own and tuple(tensor.shape) != tuple(own[name].shape)
    ]
    if mismatched:
        raise UserInputError(
            f"the checkpoint's parameters do not fit this model ({'; '.join(mismatched[:3])}); "
            "use the --arch and model options the checkpoint was trained with"
        )


def register_sized_model(
    base_model: type, base_config: type, name: str, summary: str, **sizes
) -> type:
    """Register ``name`` as a subclass of ``base_model`` whose config (a subclass of
    ``base_config``) defaults to ``sizes``, help strings kept.

    A ``register_model_architecture`` function would only serve ``--arch``: fairseq's hydra path
    fills every field from the dataclass of the model an architecture belongs to before calling
    the architecture function, so ``model._name: <arch>`` in a config got the generic sizes. A
    model of its own with a dataclass of these defaults serves ``--arch`` and configs alike.
    """
    base = {config_field.name: config_field for config_field in fields(base_config)}
    class_name = "".join(part.capitalize() for part in name.split("_"))
    config = make_dataclass(
        f"{class_name}Config",
        [
            (key, base[key].type, field(default=value, metadata=dict(base[key].metadata)))
            for key, value in sizes.items()
        ],
        bases=(base_config,),
    )
    config.__doc__, config.__module__ = summary, base_config.__module__
    model = type(
        class_name, (base_model,), {"__doc__": summary, "__module__": base_model.__module__}
    )
    return register_model(name, dataclass=config)(model)
