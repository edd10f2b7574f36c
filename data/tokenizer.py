"""The byte-level BPE tokenizer (HF `tokenizers`): training, loading, lossless decoding.

No normaliser and a byte-level pre-tokeniser and decoder: every string encodes and decodes back
exactly. The only special token is EOS, appended to every document. Text that happens to
contain the EOS string encodes to the EOS id too (as in GPT-2) and still decodes back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.manifest import BUILD_HINT, DatasetError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 257  # the 256 byte tokens plus EOS


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with `vocab_size` tokens (EOS included) learned on documents."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DatasetError(
            f"--vocab-size {vocab_size} is too small: a byte-level vocabulary needs at least "
            f"{MIN_VOCAB_SIZE} tokens (256 bytes + EOS)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def tokenizer_path(path: str | Path) -> Path:
    """The tokenizer.json file `path` names: itself, or the one in the directory `path` (a
    dataset, an HF model); DatasetError when there is none."""
    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise DatasetError(
                f"tokenizer directory {path} has no {TOKENIZER_FILE}; give a {TOKENIZER_FILE} "
                f"file or a directory holding one"
            )
        return path / TOKENIZER_FILE
    if not path.is_file():
        raise DatasetError(f"tokenizer file {path} does not exist")
    return path


def read_tokenizer_file(file: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json file (or a directory holding one), with a clear error
    when it is not one."""
    file = tokenizer_path(file)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DatasetError(f"{file} is not a HF tokenizers tokenizer.json: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the dataset directory `path` (its tokenizer.json)."""
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        raise DatasetError(f"{file} does not exist: {path} is not a dataset; {BUILD_HINT}")
    return read_tokenizer_file(file)


def eos_id(tokenizer: Tokenizer, token: str = EOS_TOKEN) -> int:
    """The id of the EOS token; DatasetError naming the fix when the vocabulary lacks it."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise DatasetError(
            f"the tokenizer has no {token!r} token; add it as a special token or pass "
            f"--eos-token with one it has"
        )
    return found


def decode_document(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of one stored document: its ids without the trailing EOS, decoded losslessly."""
    return tokenizer.decode(list(ids[:-1]), skip_special_tokens=False)
