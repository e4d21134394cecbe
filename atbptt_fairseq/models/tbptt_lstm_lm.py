"""A stateful LSTM language model for truncated backpropagation through time (the state protocol
is :mod:`atbptt_fairseq.models.stateful`'s)."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import register_model
from torch import Tensor, nn

from atbptt_fairseq.models.stateful import (
    StatefulDecoder,
    StatefulLanguageModel,
    register_sized_model,
)

LstmState = Tuple[Tensor, Tensor]  # (h, c), each num_layers x B x H


@dataclass
class TbpttLstmLmConfig(FairseqDataclass):
    embed_dim: int = field(default=512, metadata={"help": "token embedding dimension"})
    hidden_size: int = field(default=512, metadata={"help": "LSTM hidden units per layer"})
    num_layers: int = field(default=1, metadata={"help": "number of stacked LSTM layers"})
    dropout: float = field(
        default=0.2,
        metadata={"help": "dropout on the embeddings, between LSTM layers and before the output"},
    )
    tie_embeddings: bool = field(
        default=False,
        metadata={
            "help": "share the input embedding and output projection (needs embed_dim == hidden_size)"
        },
    )


class TbpttLstmDecoder(StatefulDecoder):
    """Embedding, dropout, fused multi-layer ``nn.LSTM``, dropout, (tied) output projection."""

    def __init__(self, cfg: TbpttLstmLmConfig, dictionary) -> None:
        super().__init__(dictionary)
        if cfg.tie_embeddings and cfg.embed_dim != cfg.hidden_size:
            raise ValueError(
                f"--tie-embeddings needs --embed-dim ({cfg.embed_dim}) == --hidden-size "
                f"({cfg.hidden_size}); change one of them"
            )
        num_tokens = len(dictionary)
        self.num_layers = cfg.num_layers
        self.hidden_size = cfg.hidden_size
        self.embed_tokens = nn.Embedding(num_tokens, cfg.embed_dim, padding_idx=dictionary.pad())
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.embed_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        if cfg.tie_embeddings:
            self.output_weight = self.embed_tokens.weight
        else:
            self.output_weight = nn.Parameter(torch.empty(num_tokens, cfg.hidden_size))
            nn.init.normal_(self.output_weight, std=cfg.hidden_size**-0.5)
        self.output_bias = nn.Parameter(torch.zeros(num_tokens))
        nn.init.uniform_(self.embed_tokens.weight, -0.1, 0.1)

    def zero_state(self, batch_size: int) -> LstmState:
        weight = self.embed_tokens.weight
        shape = (self.num_layers, batch_size, self.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)

    def project(self, features: Tensor) -> Tensor:
        """Output logits for LSTM features (... x H -> ... x V)."""
        return F.linear(self.dropout(features), self.output_weight, self.output_bias)

    def forward(
        self,
        prev_output_tokens: Tensor,
        src_lengths: Optional[Tensor] = None,
        state: Optional[LstmState] = None,
        carry_offset: Optional[int] = None,
        output_start: int = 0,
        stream: Optional[str] = None,
        start_of_stream: bool = False,
        **unused,
    ) -> Tuple[Tensor, Dict[str, object]]:
        """Run the LSTM over ``prev_output_tokens`` (B x T) from ``state``.

        ``carry_offset``: also return the (detached) state after that many steps as
        ``carried_state``, the state the next segment starts from (overlap TBPTT).
        ``output_start``: compute logits only from that position on (earlier positions are context).
        ``stream``: carry the state inside the model under this key (evaluation), starting from zero
        when ``start_of_stream`` is set or the batch size changed.
        """
        batch_size, length = prev_output_tokens.shape
        state = self.initial_state(batch_size, state, stream, start_of_stream)
        x = self.dropout(self.embed_tokens(prev_output_tokens))  # B x T x E
        if carry_offset is not None and 0 < carry_offset < length:
            head, carried = self.lstm(x[:, :carry_offset], state)
            tail, final = self.lstm(x[:, carry_offset:], carried)
            features = torch.cat([head, tail], dim=1)  # B x T x H
        else:
            features, final = self.lstm(x, state)
            carried = state if carry_offset == 0 else final
        logits = self.project(features[:, output_start:])  # B x (T - output_start) x V
        self.remember(stream, final)
        extra = {
            "state": final,
            "carried_state": (carried[0].detach(), carried[1].detach()),
        }
        return logits, extra

    def step(self, tokens: Tensor, state: LstmState) -> Tuple[Tensor, LstmState]:
        """One recurrent step: tokens (B,), state -> logits B x V and the full next state."""
        next_state = self.advance(tokens, state)
        return self.readout(next_state), next_state

    def readout(self, state: LstmState) -> Tensor:
        """Logits B x V from a full state (the top layer's h)."""
        return self.project(state[0][-1])

    def advance(self, tokens: Tensor, state: LstmState) -> LstmState:
        """One recurrent step without the output layer: tokens (B,), state -> the full next state.

        Used by the bias estimator, which needs every step's state in the autograd graph. It runs
        ``torch.lstm_cell`` on the fused LSTM's own weights (the same arithmetic): one fused
        ``nn.LSTM`` call per step costs several times more on CPU (oneDNN's per-call overhead).
        """
        h, c = state  # num_layers x B x H each
        x = self.dropout(self.embed_tokens(tokens))  # B x E
        next_h, next_c = [], []
        for layer in range(self.num_layers):
            h_layer, c_layer = torch.lstm_cell(
                x,
                (h[layer], c[layer]),
                getattr(self.lstm, f"weight_ih_l{layer}"),
                getattr(self.lstm, f"weight_hh_l{layer}"),
                getattr(self.lstm, f"bias_ih_l{layer}"),
                getattr(self.lstm, f"bias_hh_l{layer}"),
            )
            next_h.append(h_layer)
            next_c.append(c_layer)
            x = F.dropout(h_layer, self.lstm.dropout, self.training)
        return torch.stack(next_h), torch.stack(next_c)


@register_model("tbptt_lstm_lm", dataclass=TbpttLstmLmConfig)
class TbpttLstmLanguageModel(StatefulLanguageModel):
    """Stateful LSTM LM (embedding, LSTM, projection: :class:`TbpttLstmDecoder`).

    Satisfies :class:`atbptt.protocol.RecurrentModel`, so the plain-PyTorch driver trains it too.
    """

    vocabulary_parameter = "decoder.embed_tokens.weight"

    @classmethod
    def build_model(cls, cfg: TbpttLstmLmConfig, task) -> "TbpttLstmLanguageModel":
        return cls(TbpttLstmDecoder(cfg, task.target_dictionary))

    def step(self, tokens: Tensor, state: LstmState) -> Tuple[Tensor, LstmState]:
        return self.decoder.step(tokens, state)

    def advance(self, tokens: Tensor, state: LstmState) -> LstmState:
        return self.decoder.advance(tokens, state)

    def readout(self, state: LstmState) -> Tensor:
        return self.decoder.readout(state)


def register_architecture(name: str, summary: str, **sizes) -> type:
    """Register ``name`` as a ``tbptt_lstm_lm`` whose config defaults are ``sizes``."""
    return register_sized_model(TbpttLstmLanguageModel, TbpttLstmLmConfig, name, summary, **sizes)


TbpttLstmLmPtb = register_architecture(
    "tbptt_lstm_lm_ptb",
    "The paper's PTB model: 1 layer of 900 units, tied embeddings, dropout 0.2.",
    embed_dim=900,
    hidden_size=900,
    num_layers=1,
    dropout=0.2,
    tie_embeddings=True,
)
TbpttLstmLmWiki2 = register_architecture(
    "tbptt_lstm_lm_wiki2",
    "The paper's WikiText-2 model: 1 layer of 512 units, tied embeddings, dropout 0.2.",
    embed_dim=512,
    hidden_size=512,
    num_layers=1,
    dropout=0.2,
    tie_embeddings=True,
)
TbpttLstmCopy = register_architecture(
    "tbptt_lstm_copy",
    "The paper's copy-task model: embedding 50, 2 layers of 50 units, untied, no dropout.",
    embed_dim=50,
    hidden_size=50,
    num_layers=2,
    dropout=0.0,
    tie_embeddings=False,
)
TbpttLstmLmTiny = register_architecture(
    "tbptt_lstm_lm_tiny",
    "A few thousand parameters, for tests.",
    embed_dim=16,
    hidden_size=16,
    num_layers=1,
    dropout=0.0,
    tie_embeddings=True,
)
