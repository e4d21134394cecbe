"""Presets: the training options of a paper setting for fixed-K and adaptive runs, with the
grids its configs declare; composed by hydra from the configs of ``configs/`` (one copy of the
settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fairseq_process import REPO
from .launchers import hydra_app

CONFIG_DIR = REPO / "configs"


@dataclass
class Preset:
    """Training arguments of one paper setting, for fixed-K and for adaptive runs."""

    fixed_args: list[str]
    adaptive_args: list[str]
    fixed_grid: str
    delta_grid: str
    description: str = ""


# keys of the hydra configs the sweep sets per run (or drops: the budget is the sweep's)
SWEEP_CONFIG_KEYS = {
    "data",
    "user_dir",
    "save_dir",
    "max_epoch",
    "seed",
    "log_format",
    "log_interval",
    "target_bias",
    "monitor_bias",
}


CONFIG_NAME_FLAGS = {
    "model": "--arch",
    "criterion": "--criterion",
    "optimizer": "--optimizer",
    "lr_scheduler": "--lr-scheduler",
}


def composed_config(name: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The hydra config ``name`` of ``config_dir`` as hydra composes it for a run (its
    ``hydra`` node included), interpolations left as written."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    with hydra_app(config_dir) as hydra:
        config = hydra.compose_config(name, [], run_mode=RunMode.RUN, with_log_configuration=False)
    return OmegaConf.to_container(config, resolve=False)


def config_args(config: dict[str, Any], keep_truncation_length: bool = True) -> list[str]:
    """Turn a composed hydra config of ``configs/`` into fairseq-train options."""
    args: list[str] = []
    for group, values in config.items():
        if group in ("hydra", "common", "checkpoint") or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key == "_name":
                if group in CONFIG_NAME_FLAGS:
                    args += [CONFIG_NAME_FLAGS[group], str(value)]
                continue
            if key in SWEEP_CONFIG_KEYS:
                continue
            if key == "truncation_length" and not keep_truncation_length:
                continue
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                args += [flag, ",".join(str(item) for item in value)]
            else:
                args += [flag, str(value)]
    return args


def config_grid(config: dict[str, Any], key: str) -> str:
    """The grid a composed hydra config of ``configs/`` sweeps with ``-m``
    (``hydra.sweeper.params``)."""
    return str(config["hydra"]["sweeper"]["params"][key]).replace(" ", "")


def _config_preset(corpus: str) -> Preset:
    fixed, adaptive = composed_config(f"{corpus}_fixed"), composed_config(f"{corpus}_adaptive")
    return Preset(
        fixed_args=config_args(fixed, keep_truncation_length=False),
        adaptive_args=config_args(adaptive),
        fixed_grid=config_grid(fixed, "task.truncation_length"),
        delta_grid=config_grid(adaptive, "task.target_bias"),
        description=f"configs/{corpus}_fixed.yaml and _adaptive.yaml",
    )


BIBLE_SMALL_MODEL = [
    "--arch", "tbptt_lstm_lm", "--embed-dim", "128", "--hidden-size", "128", "--num-layers", "1",
    "--tie-embeddings", "--dropout", "0.1", "--criterion", "tbptt_cross_entropy",
    "--optimizer", "tbptt_sgd", "--lr", "10", "--clip-norm", "0.25", "--weight-decay", "1e-7",
    "--batch-size", "32", "--lr-scheduler", "fixed",
    "--estimate-window", "200", "--estimate-interval", "200", "--estimate-sequences", "32",
]  # fmt: skip


def get_preset(name: str) -> Preset:
    """The paper's settings by corpus (copy, ptb, wiki2; bible: the language-model protocol on the
    King James Bible with a 1 x 128 model) or a small CPU model (bible-small)."""
    if name in ("copy", "ptb", "wiki2", "bible"):
        return _config_preset(name)
    if name == "bible-small":
        return Preset(
            fixed_args=list(BIBLE_SMALL_MODEL),
            adaptive_args=BIBLE_SMALL_MODEL
            + ["--truncation-length", "35", "--min-truncation-length", "5"]
            + ["--max-truncation-length", "150", "--lr-scaling", "sqrt"],
            fixed_grid="5,10,20,35,70",
            delta_grid="0.9,0.5,0.1",
            description="1 x 128 tied LSTM, batch 32, SGD lr 10 (K0 35, W 200, K in [5, 150])",
        )
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("copy", "ptb", "wiki2", "bible", "bible-small")
