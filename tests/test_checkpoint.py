"""The core's safe checkpoint loader (``atbptt.load_checkpoint``): verified, weights-only, one line."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, PickledCommand, flip_bit_in_member

from atbptt import CheckpointError, load_checkpoint


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_sound_checkpoint_loads_weights_only(tmp_path):
    path = tmp_path / "good.pt"
    torch.save({"weight": torch.arange(6.0), "step": 3}, path)
    state = load_checkpoint(path, map_location="cpu")
    assert torch.equal(state["weight"], torch.arange(6.0)) and state["step"] == 3


def test_flipped_byte_in_tensor_data_is_corrupt_naming_the_member(tmp_path):
    good, flipped = tmp_path / "good.pt", tmp_path / "flipped.pt"
    torch.save({"a": torch.zeros(64), "b": torch.ones(64)}, good)
    member = flip_bit_in_member(good, flipped, "data/1")
    assert not torch.equal(torch.load(flipped, weights_only=True)["b"], torch.ones(64))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(flipped)
    message = one_line(error)
    assert f"checkpoint {flipped} is corrupt: {member} fails its CRC-32 check" in message


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"payload": PickledCommand(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert one_line(error).startswith(
        f"refusing to load checkpoint {path}: it pickles posix.system"
    )
    assert not marker.exists()


def test_pickled_code_is_refused_whatever_the_environment_says(tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes a plain torch.load run the payload: not here."""
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"payload": PickledCommand(marker)}, path)
    probe = (
        "import sys, atbptt\n"
        "try:\n"
        "    atbptt.load_checkpoint(sys.argv[1])\n"
        "except atbptt.CheckpointError as error:\n"
        "    print(error)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    result = subprocess.run(
        [sys.executable, "-c", probe, str(path)], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"refusing to load checkpoint {path}"), result.stdout
    assert not marker.exists()


def test_the_unpickler_itself_stays_weights_only(tmp_path, monkeypatch):
    """With the static check bypassed, the forced weights-only unpickler still refuses."""
    from atbptt import checkpoint

    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"payload": PickledCommand(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(checkpoint, "check_checkpoint_file", lambda path, advice: None)
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(path)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored afterwards
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_legacy_format_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"weight": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = one_line(error)
    assert message.startswith(f"refusing to load checkpoint {path}: it is in torch's legacy")
    assert "no checksums" in message


def test_missing_file_is_one_line(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert (
        one_line(error) == f"checkpoint {path} does not exist; give the path of a checkpoint file"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"not a checkpoint at all", "not a PyTorch checkpoint"),
        (b"PK\x03\x04" + b"\0" * 64, "truncated or corrupt"),
    ],
    ids=["empty", "text", "zip-start"],
)
def test_garbage_is_one_line_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, advice="try another")
    message = one_line(error)
    assert str(path) in message and expected in message and message.endswith("try another")


def test_truncated_checkpoint_is_one_line(tmp_path):
    good, truncated = tmp_path / "good.pt", tmp_path / "truncated.pt"
    torch.save({"weight": torch.zeros(256)}, good)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        load_checkpoint(truncated)
    assert str(truncated) in one_line(error)
