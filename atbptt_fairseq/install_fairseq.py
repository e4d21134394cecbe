"""``atbptt-install-fairseq``: install fairseq-fixed the one way that keeps your torch.

fairseq-fixed's metadata requires torchaudio, which makes pip resolve a multi-GB CUDA torch (and
replace a torch you chose), and it is an sdist whose isolated build would resolve an unpinned
torch as well. So it is installed with ``--no-deps --no-build-isolation``, against the torch,
numpy, Cython and setuptools already installed, after its runtime dependencies (the package's
``fairseq`` extra). Extra arguments go to pip (e.g. ``--no-index --find-links DIR``).

    pip install 'atbptt-fairseq[fairseq]'
    atbptt-install-fairseq            # or: python -m atbptt_fairseq.install_fairseq
"""

import argparse
import importlib.util
import subprocess
import sys
from typing import List, Optional, Sequence

from atbptt_fairseq.dependencies import PACKAGE, install_hint

FAIRSEQ_REQUIREMENT = "fairseq-fixed==0.12.3.1"
# what the build of fairseq-fixed's C++ and Cython helpers imports (no build isolation)
BUILD_MODULES = ("torch", "numpy", "Cython", "setuptools")


def pip_command(pip_args: Sequence[str]) -> List[str]:
    """The pip command that installs fairseq-fixed into this interpreter's environment."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
            *pip_args, FAIRSEQ_REQUIREMENT]  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Install fairseq-fixed unless fairseq is importable (``--force``: anyway)."""
    parser = argparse.ArgumentParser(
        prog="atbptt-install-fairseq",
        description=f"install {FAIRSEQ_REQUIREMENT} with --no-deps --no-build-isolation",
        epilog="other arguments go to pip install",
    )
    parser.add_argument("--force", action="store_true", help="install even if fairseq imports")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command only")
    args, pip_args = parser.parse_known_args(argv)
    command = pip_command(pip_args)
    if args.dry_run:
        print(" ".join(command))
        return 0
    if importlib.util.find_spec("fairseq") is not None and not args.force:
        print("fairseq is already installed (--force installs fairseq-fixed again)")
        return 0
    missing = [name for name in BUILD_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        hint = install_hint("torch") if "torch" in missing else f"pip install '{PACKAGE}[fairseq]'"
        print(
            f"atbptt-install-fairseq: error: building fairseq needs {', '.join(missing)}: {hint}",
            file=sys.stderr,
        )
        return 1
    print(" ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
