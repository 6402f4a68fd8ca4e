"""Tokenizer loading: a Hugging Face `tokenizer.json` beside the weights."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from mistral_export.errors import MistralExportError

BOS, EOS = "<s>", "</s>"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: Path) -> TextTokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        hint = " (sentencepiece tokenizer.model is not supported; save a tokenizer.json with the `tokenizers` library)" \
            if (Path(folder) / "tokenizer.model").exists() else ""
        raise MistralExportError(f"{folder}: no tokenizer.json found{hint}")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path)))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise MistralExportError(f"{path}: not a valid tokenizer.json ({exc})") from None
