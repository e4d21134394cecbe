from atbptt_fairseq.models.onehot_recurrent_lm import OneHotRecurrentLanguageModel  # noqa: F401
from atbptt_fairseq.models.tbptt_lstm_lm import TbpttLstmLanguageModel  # noqa: F401
