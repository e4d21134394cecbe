from atbptt_fairseq.tasks.adaptive_tbptt_lm import AdaptiveTbpttLmTask  # noqa: F401
