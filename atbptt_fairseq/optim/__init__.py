from atbptt_fairseq.optim.tbptt_sgd import TbpttSgd  # noqa: F401
