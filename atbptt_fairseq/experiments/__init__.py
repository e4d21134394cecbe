"""The experiment machinery behind ``scripts/``: data preparation, sweeps, results, plots and
benchmarks, importable (``scripts/*.py`` are thin command lines over it).

Nothing here is needed to train: the method is :mod:`atbptt`, the fairseq plugin the rest of
:mod:`atbptt_fairseq`. The modules start fairseq's command-line tools as subprocesses and read
what they write; none imports fairseq or torch at module level.
"""
