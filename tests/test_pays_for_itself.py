"""docs/pays_for_itself/summarize.py mends the records of runs whose sweep was killed."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GAPPED_LOG = """\
# sweep attempt 2026-01-01T00:00:00: fairseq-train data ...
2026-01-01 00:00:01 | INFO | train_inner | {"ppb": "20000", "num_updates": "10"}
2026-01-01 00:00:02 | INFO | train_inner | {"ppb": "20000", "num_updates": "20"}
2026-01-01 00:00:03 | INFO | valid | {"valid_ppl": "200", "valid_num_updates": "20"}
# sweep attempt 2026-01-01T01:00:00: fairseq-train data ...
2026-01-01 01:00:01 | INFO | fairseq.trainer | Loaded checkpoint ck/checkpoint_last.pt (epoch 1 @ 40 updates)
2026-01-01 01:00:02 | INFO | train_inner | {"ppb": "30000", "num_updates": "50"}
2026-01-01 01:00:03 | INFO | valid | {"valid_ppl": "100", "valid_num_updates": "60"}
2026-01-01 01:00:04 | INFO | x | Stopping training due to processed tokens: 1,200,000 >= max_processed_tokens: 1,200,000
"""  # noqa: E501


def load_summarize():
    path = REPO / "docs" / "pays_for_itself" / "summarize.py"
    spec = importlib.util.spec_from_file_location("pays_for_itself_summarize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_log_gap_is_mended_from_the_stop_line_and_the_printed_validations(tmp_path):
    summarize = load_summarize()
    run = tmp_path / "kjv" / "rule" / "runs" / "delta0.1_s1"
    run.mkdir(parents=True)
    (run / "train.log").write_text(GAPPED_LOG)
    assert summarize.log_gap(GAPPED_LOG) == 20  # the first attempt's log ends before update 40
    valid = [  # the parsed count after the gap is 100k high
        {"num_updates": "20", "processed_tokens": "400000", "valid_ppl": "200"},
        {"num_updates": "60", "processed_tokens": "1300000", "valid_ppl": "100"},
    ]
    trajectory = [
        {"num_updates": "10", "processed_tokens": "200000"},
        {"num_updates": "50", "processed_tokens": "1100000"},
    ]
    recovered = [{"num_updates": "40", "valid_ppl": "150"}]
    note = summarize.mend(run, valid, trajectory, recovered)
    assert [(row["num_updates"], float(row["processed_tokens"])) for row in valid] == [
        ("20", 400000), ("40", 800000), ("60", 1200000)
    ]  # fmt: skip
    assert [float(row["processed_tokens"]) for row in trajectory] == [200000, 1000000]
    assert "after update 20" in note and "-0.10M" in note and "1 validation(s) recovered" in note
    resumed_from_what_it_holds = GAPPED_LOG.replace("@ 40 updates", "@ 20 updates")
    assert summarize.log_gap(resumed_from_what_it_holds) is None  # nothing lost


def test_records_written_twice_keep_the_later():
    summarize = load_summarize()
    rows = [{"update": 0, "k": 1}, {"update": 1, "k": 1}, {"update": 0, "k": 2}]
    assert summarize.last_of_each(rows, "update") == [{"update": 0, "k": 2}, {"update": 1, "k": 1}]
