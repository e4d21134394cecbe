from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel  # noqa: F401
