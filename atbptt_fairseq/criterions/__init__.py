from atbptt_fairseq.criterions.tbptt_cross_entropy import TbpttCrossEntropyCriterion  # noqa: F401
