"""What to install when an optional dependency is missing, said in one line.

The package's base install is the core (torch and numpy); fairseq, its runtime dependencies,
Lightning and the experiments' packages are extras of ``pyproject.toml``. fairseq-fixed itself is
not an extra: its metadata requires torchaudio, which pulls a CUDA torch, so it is installed with
``--no-deps`` by ``atbptt-install-fairseq`` (:mod:`atbptt_fairseq.install_fairseq`). This module
imports none of them, so the package's commands can say what is missing.
"""

from typing import Dict, Optional

PACKAGE = "atbptt-fairseq"
INSTALL_FAIRSEQ = "atbptt-install-fairseq"

# the top-level module a missing import names -> what installs it
_EXTRAS: Dict[str, str] = {
    # fairseq's runtime dependencies (the `fairseq` extra); a few import under another name
    **dict.fromkeys(
        [
            "bitarray",
            "hydra",
            "omegaconf",
            "regex",
            "sacrebleu",
            "sklearn",
            "tqdm",
            "cffi",
            "Cython",
            "pyximport",
            "packaging",
            "tensorboardX",
            "antlr4",
            "yaml",
        ],
        "fairseq",
    ),  # fmt: skip
    **dict.fromkeys(["lightning", "pytorch_lightning", "lightning_fabric"], "lightning"),
    **dict.fromkeys(["matplotlib", "sentencepiece", "hydra_plugins"], "experiments"),
}


def install_hint(module: str) -> str:
    """The command that installs the top-level ``module`` for this package."""
    top = module.split(".")[0]
    if top in ("fairseq", "fairseq_cli"):
        return (
            f"{INSTALL_FAIRSEQ} (fairseq-fixed with --no-deps, after pip install "
            f"'{PACKAGE}[fairseq]')"
        )
    if top == "torch":
        return "pip install torch==2.13.0 (or the CUDA build of torch >= 2.5 for your GPU)"
    if top in _EXTRAS:
        return f"pip install '{PACKAGE}[{_EXTRAS[top]}]'"
    return f"pip install {top}"


def missing_dependency_message(error: BaseException) -> Optional[str]:
    """One line for a ``ModuleNotFoundError`` of a missing package: the module and what installs
    it; None for any other error (or a module missing inside this package, which is a bug)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.split(".")[0]
    if top in ("atbptt", "atbptt_fairseq", "atbptt_lightning"):
        return None
    return f"No module named '{error.name}': install it with {install_hint(top)}"
