"""Cross-entropy over the scored positions of a TBPTT segment."""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from omegaconf import II
from torch import Tensor

from atbptt import LoopSegment
from atbptt_fairseq.errors import UserInputError


@dataclass
class TbpttCrossEntropyConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("tbptt_cross_entropy", dataclass=TbpttCrossEntropyConfig)
class TbpttCrossEntropyCriterion(FairseqCriterion):
    """Summed token cross-entropy over ``sample["target"]``, which holds only the scored positions
    (the model computes logits only from ``output_start`` on, so the overlap prefix is context).

    Normalised like fairseq's ``cross_entropy`` (loss in base 2, perplexity derived). Training
    calls :meth:`forward_carrying_state`, which also returns the state the model carries on; the
    task logs K and the other figures of the method (the loop's records).
    """

    def __init__(self, task, sentence_avg: bool) -> None:
        super().__init__(task)
        self.sentence_avg = sentence_avg

    def forward(self, model, sample, reduce: bool = True):
        """fairseq's criterion interface (validation): loss, sample size, logging output."""
        loss, sample_size, logging_output, _ = self.forward_carrying_state(model, sample, reduce)
        return loss, sample_size, logging_output

    def forward_carrying_state(
        self, model, sample, reduce: bool = True
    ) -> Tuple[Tensor, int, Dict[str, Any], Optional[Tuple[Tensor, ...]]]:
        """:meth:`forward`, plus the detached state after ``carry_offset`` steps, which the next
        segment starts from (None when the model returns none)."""
        logits, extra = model(**sample["net_input"])  # B x K x V
        target = sample["target"]  # B x K
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            target.reshape(-1),
            ignore_index=self.padding_idx,
            reduction="sum" if reduce else "none",
        )
        ntokens = sample["ntokens"]
        sample_size = target.size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "ntokens": ntokens,
            "nsentences": target.size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output, extra.get("carried_state")

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        # divide by log(2) to report the loss in base 2, as fairseq's cross_entropy does
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        if sample_size != ntokens:
            metrics.log_scalar("nll_loss", loss_sum / ntokens / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        else:
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def segment_forward(
    criterion: Any, model: Any, segment: LoopSegment, amp: bool
) -> Tuple[Tensor, Optional[Tuple[Tensor, ...]]]:
    """Truncated BPTT's forward for :meth:`atbptt.TbpttLoop.train`: the summed loss of a loop
    segment and the state after ``carry_offset`` steps, by ``criterion`` through ``model`` (the
    wrapped model, so that DDP sees the forward), under CUDA autocast with ``amp``."""
    while hasattr(criterion, "module"):
        criterion = criterion.module
    forward = getattr(criterion, "forward_carrying_state", None)
    if forward is None:
        raise UserInputError(
            "adaptive_tbptt_lm trains with --criterion tbptt_cross_entropy, which hands it the "
            f"recurrent state to carry into the next update; {type(criterion).__name__} does not"
        )
    with torch.amp.autocast("cuda", enabled=amp):
        loss, _, _, carried = forward(model, segment_sample(segment))
    return loss, carried


def segment_sample(segment: LoopSegment) -> Dict[str, Any]:
    """A loop segment as the criterion's sample: the model's inputs and the scored targets."""
    return {
        "net_input": {
            "src_tokens": segment.inputs,
            "state": segment.state,
            "carry_offset": segment.carry_offset,
            "output_start": segment.output_start,
        },
        "target": segment.targets,
        "ntokens": segment.targets.numel(),
    }
