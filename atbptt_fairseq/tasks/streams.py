"""The data of the ``adaptive_tbptt_lm`` task: its dictionary, its splits as token streams, the
prebuilt chunks of a stateful evaluation, and the checks that a checkpoint fits them."""

import hashlib
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, FairseqDataset, data_utils, iterators
from fairseq.data.indexed_dataset import MMapIndexedDataset
from torch import Tensor

from atbptt import StreamTooShortError, lay_out_columns
from atbptt_fairseq.errors import UserInputError


class SplitStream(FairseqDataset):
    """A whole split as a 1-D token stream, with an optional token-aligned target stream.

    Batched only by this task's ``get_batch_iterator``, which lays it out in columns.
    """

    def __init__(self, name: str, tokens: Tensor, targets: Optional[Tensor] = None) -> None:
        super().__init__()
        self.name = name
        self.tokens = tokens  # N
        self.targets = targets  # N, or None: the target is the next token

    def __len__(self) -> int:
        return self.tokens.numel()

    def __getitem__(self, index: int) -> Tensor:
        return self.tokens[index]


class SlotDataset(FairseqDataset):
    """A fixed number of items that index update slots (training) or prebuilt batches (evaluation)."""

    def __init__(self, items: List[Dict[str, Any]]) -> None:
        super().__init__()
        self.items = items

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        assert len(samples) == 1, "every item is a whole batch"
        return samples[0]


def dictionary_identity(dictionary: Dictionary) -> Dict[str, Any]:
    """What a checkpoint records of the dictionary it was trained with: the sha256 of its symbols
    in id order (the meaning of every token id; counts left out) and, for messages, its size.

    Sizes match easily (fairseq pads a dictionary to a multiple of 8), so only the hash tells two
    corpora's dictionaries apart.
    """
    joined = "\n".join(dictionary.symbols).encode("utf-8")
    return {"sha256": hashlib.sha256(joined).hexdigest(), "types": len(dictionary)}


def load_dictionary(data: Optional[str], target_dir: Optional[str]) -> Dictionary:
    """The dictionary of a fairseq-preprocess data directory (the first of colon-separated
    shards), every path checked, and the target dictionary compared."""
    paths = utils.split_paths(data or "")
    if not paths or not paths[0]:
        raise UserInputError(
            "no data directory given; pass the fairseq-preprocess --only-source output directory"
        )
    for path in paths:
        if not os.path.isdir(path):
            raise UserInputError(
                f"data directory {path} does not exist; run fairseq-preprocess --only-source "
                "--destdir there first, or fix the path"
            )
    dict_path = os.path.join(paths[0], "dict.txt")
    if not os.path.isfile(dict_path):
        raise UserInputError(
            f"{dict_path} is missing; the data directory must be fairseq-preprocess output "
            "(it writes dict.txt next to the .bin/.idx files)"
        )
    dictionary = read_dictionary_file(dict_path)
    if target_dir:
        check_target_dictionary(dict_path, dictionary, paths[0], target_dir)
    return dictionary


def read_dictionary_file(path: str) -> Dictionary:
    """fairseq's dictionary at ``path``, or a one-line error saying it is not one."""
    try:
        return Dictionary.load(path)
    except Exception as error:  # noqa: BLE001  (fairseq raises ValueError or others)
        raise UserInputError(
            f"{path} is not a fairseq dictionary ({error}); regenerate it with fairseq-preprocess"
        ) from None


def check_target_dictionary(
    dict_path: str, dictionary: Dictionary, data_path: str, target_dir: str
) -> None:
    """The target stream is read with the input dictionary: refuse one binarized with
    another (its own dict.txt, when it has one, must be the same)."""
    target_dict_path = os.path.join(data_path, target_dir, "dict.txt")
    if not os.path.isfile(target_dict_path):
        return
    target_dictionary = read_dictionary_file(target_dict_path)
    inputs, targets = dictionary_identity(dictionary), dictionary_identity(target_dictionary)
    if inputs["sha256"] != targets["sha256"]:
        raise UserInputError(
            f"{target_dict_path} ({targets['types']} types, sha256 "
            f"{targets['sha256'][:12]}) is not {dict_path} ({inputs['types']} types, sha256 "
            f"{inputs['sha256'][:12]}): --target-dir {target_dir} is read with the input "
            f"dictionary; binarize the targets with fairseq-preprocess --srcdict {dict_path}"
        )


def read_stream(split_path: str, dictionary: Dictionary, combine: bool) -> Tensor:
    """The token ids of a binarized split, checked against ``dictionary``."""
    if os.path.isfile(split_path + ".bin") and os.path.getsize(split_path + ".bin") == 0:
        # fairseq cannot even open it (mmap of an empty file)
        raise UserInputError(
            f"split {split_path} is empty (fairseq-preprocess got an empty text file); give "
            "it some text and binarize it again"
        )
    data = data_utils.load_indexed_dataset(split_path, dictionary, combine=combine)
    if data is None:
        raise UserInputError(
            f"split {split_path}.bin/.idx not found; binarize it with fairseq-preprocess "
            "(--trainpref/--validpref/--testpref) or choose another split"
        )
    if isinstance(data, MMapIndexedDataset):
        buffer = np.frombuffer(data._bin_buffer, dtype=data._index.dtype)
        tokens = torch.from_numpy(buffer.astype(np.int64))
    else:
        pieces = [data[i].long() for i in range(len(data))]
        tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if tokens.numel() and int(tokens.max()) >= len(dictionary):
        raise UserInputError(
            f"{split_path} holds token ids up to {int(tokens.max())} but dict.txt has "
            f"{len(dictionary)} entries: the split was binarized with another "
            "dictionary; binarize it again with fairseq-preprocess --srcdict <this dict.txt>"
        )
    return tokens


def read_split(
    data_path: str,
    split: str,
    dictionary: Dictionary,
    target_dir: Optional[str],
    combine: bool = False,
) -> SplitStream:
    """A split of ``data_path`` (and its token-aligned targets in ``target_dir``) as a stream."""
    tokens = read_stream(os.path.join(data_path, split), dictionary, combine)
    targets = None
    if target_dir:
        targets = read_stream(os.path.join(data_path, target_dir, split), dictionary, combine)
        if targets.numel() != tokens.numel():
            raise UserInputError(
                f"{split}: the target stream has {targets.numel()} tokens, the input stream "
                f"{tokens.numel()}; binarize token-aligned inputs and targets"
            )
    if tokens.numel() < 2:
        raise UserInputError(
            f"split {split} in {data_path} holds {tokens.numel()} tokens; give it some text "
            "and binarize it again"
        )
    return SplitStream(name=f"{data_path}:{split}", tokens=tokens, targets=targets)


def evaluation_chunks(
    stream: SplitStream, columns: int, chunk: int, num_shards: int, shard_id: int
) -> List[Dict[str, Any]]:
    """Prebuilt stateful chunks of an evaluation split: ``columns`` per worker, ``chunk`` tokens
    long, each column carrying its state through the chunks in order."""
    try:
        inputs, targets = lay_out_columns(
            stream.tokens, columns * num_shards, stream.targets, shard_id, num_shards
        )
    except StreamTooShortError as error:
        raise UserInputError(
            f"evaluation split {stream.name}: {error} (--eval-batch-size)"
        ) from None
    items = []
    for index, start in enumerate(range(0, inputs.size(1), chunk)):
        src = inputs[:, start : start + chunk]  # B x T
        items.append(
            {
                "id": torch.arange(columns),
                "net_input": {
                    "src_tokens": src,
                    "src_lengths": torch.full((columns,), src.size(1)),
                    "stream": stream.name,
                    "start_of_stream": index == 0,
                },
                "target": targets[:, start : start + chunk],
                "nsentences": columns,
                "ntokens": src.numel(),
            }
        )
    return items


def check_checkpoint_targets(trained_dir: Optional[str], target_dir: Optional[str]) -> None:
    """Refuse to score a checkpoint on other targets than it learned (``trained_dir``: its
    ``--target-dir``): a copy-task model evaluated without ``--target-dir`` would be scored
    on predicting its next input."""
    if trained_dir == target_dir:
        return
    if target_dir is None:
        raise UserInputError(
            f"the checkpoint was trained to predict the targets in --target-dir "
            f"{trained_dir}; pass --target-dir {trained_dir} to score it on them"
        )
    learned = f"--target-dir {trained_dir}" if trained_dir else "the next token"
    raise UserInputError(
        f"the checkpoint was trained to predict {learned}, not the targets in --target-dir "
        f"{target_dir}; use the --target-dir it was trained with"
        + ("" if trained_dir else " (none: leave the option out)")
    )


def check_dictionary_identity(
    trained: Optional[Dict[str, Any]], own: Dict[str, Any], dict_path: str
) -> bool:
    """Refuse a checkpoint trained with another dictionary than ``dict_path``'s (its token ids
    would mean other words); False when the checkpoint recorded none (an older plugin's)."""
    if not trained or "sha256" not in trained:
        return False
    if trained["sha256"] != own["sha256"]:
        raise UserInputError(
            f"the checkpoint was trained with a dictionary of {trained.get('types', '?')} "
            f"types (sha256 {trained['sha256'][:12]}), not this data directory's {dict_path} "
            f"({own['types']} types, sha256 {own['sha256'][:12]}): evaluate or resume with "
            "the data directory (dict.txt) it was trained on, or binarize your text with "
            "fairseq-preprocess --srcdict <that dict.txt>"
        )
    return True


def batch_iterator(
    items: List[Dict[str, Any]],
    epoch: int = 1,
    buffer_size: int = 0,
    skip_remainder_batch: bool = False,
) -> iterators.EpochBatchIterator:
    """fairseq's iterator over ``items``, each one whole batch, in order."""
    return iterators.EpochBatchIterator(
        dataset=SlotDataset(items),
        collate_fn=lambda samples: samples[0],
        batch_sampler=[[i] for i in range(len(items))],
        num_workers=0,
        epoch=epoch,
        buffer_size=buffer_size,
        disable_shuffling=True,
        skip_remainder_batch=skip_remainder_batch,
    )
