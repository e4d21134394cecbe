"""The method's figures in fairseq's metrics (the loop's records, reduced over workers)."""

from typing import Any, Dict, List

from fairseq import metrics
from fairseq.logging.meters import AverageMeter

# fairseq-train's aggregator of a whole epoch (its "train" log line)
EPOCH_AGGREGATOR = "train"


def reduce_method_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
    """Log the method's figures of an update's logging outputs (identical on every worker and
    micro-batch, counted by ``tbptt_parts``): ``trunc_k`` (a mean over the updates of the log
    interval) and ``trunc_k_last`` (the last update's), the estimate's ``bias_hat``/``beta_hat``,
    ``lr_scale``, processed tokens per batch (``ppb``) and estimate seconds (``est_sec``)."""
    parts = sum(log.get("tbptt_parts", 0) for log in logging_outputs)
    if parts == 0:
        return
    trunc_k = sum(log.get("trunc_k", 0) for log in logging_outputs) / parts
    metrics.log_scalar("trunc_k", trunc_k, weight=1, round=1)
    log_epoch_last("trunc_k_last", trunc_k, round=1)
    for key in ("bias_hat", "beta_hat"):
        if any(key in log for log in logging_outputs):
            value = sum(log.get(key, 0.0) for log in logging_outputs) / parts
            # unrounded: fairseq prints 6 significant digits, so a bias of 1e-6 or a decay
            # rate of 0.99993 stays readable
            metrics.log_scalar(key, value)
    if any("lr_scale" in log for log in logging_outputs):
        value = sum(log.get("lr_scale", 0.0) for log in logging_outputs) / parts
        metrics.log_scalar("lr_scale", value, round=3)
    if any("processed_tokens" in log for log in logging_outputs):
        # per update, like fairseq's wpb: sweeps cumulate it into processed tokens
        processed = sum(log.get("processed_tokens", 0) for log in logging_outputs)
        metrics.log_scalar("ppb", processed, round=1)
    if any("est_sec" in log for log in logging_outputs):
        seconds = sum(log.get("est_sec", 0.0) for log in logging_outputs)
        metrics.log_scalar_sum("est_sec", seconds, round=2)


def log_epoch_last(key: str, value: float, round: int) -> None:
    """Log ``value`` as the epoch's last value of ``key``: in the epoch's line only (a
    train_inner line's K is its interval's mean, ``trunc_k``), weight 0, so the meter shows the
    last update's value rather than a mean."""
    meters = metrics.get_meters(EPOCH_AGGREGATOR)
    if meters is None:
        return
    if key not in meters:
        meters.add_meter(key, AverageMeter(round=round), priority=50)
    meters[key].update(value, 0)
