"""The token ids validate feeds: prompts (built in, or the user's --prompts file) and the held-out text.

heldout.txt is hand-written Python in the style of the fixture's tests: neither the fixture's training
corpus (the standard library, tools/train_tiny.py) nor calibration text, so perplexity on it measures
what a model does with code it has not seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_export.artifacts.folder import TOKENIZER_FILE
from mistral_export.errors import MistralExportError
from mistral_export.model.config import ModelConfig, resolve_model_dir
from mistral_export.model.tokenizer import load_tokenizer
from mistral_export.validate.cases import default_prompt_lengths, stream

HELDOUT_FILE = Path(__file__).with_name("heldout.txt")
RANDOM_TOKENS = 1024  # held-out length when there is no tokenizer (random ids)


@dataclass
class Texts:
    prompts: list[tuple[str, list[int]]]  # (name, token ids)
    heldout: list[int]
    tokenizer: str  # where the ids came from


def read_prompts(path: Path) -> list[str]:
    """A JSON list of strings (*.json), else one prompt per non-empty line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MistralExportError(f"--prompts {path}: cannot read it ({exc.strerror})") from None
    if Path(path).suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MistralExportError(f"--prompts {path}: not valid JSON ({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise MistralExportError(f"--prompts {path}: expected a JSON list of non-empty strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MistralExportError(f"--prompts {path}: no prompts in it")
    return prompts


def _tokenizer_folder(build_dir: Path, model_source: str | None) -> Path | None:
    if (build_dir / TOKENIZER_FILE).exists():
        return build_dir
    folder = resolve_model_dir(model_source) if model_source else None
    return folder if folder is not None and (folder / TOKENIZER_FILE).exists() else None


def load_texts(
    build_dir: Path, model_source: str | None, config: ModelConfig, prompts_file: Path | None, quick: bool
) -> Texts:
    folder = _tokenizer_folder(Path(build_dir), model_source)
    if folder is None:
        if prompts_file is not None:
            raise MistralExportError(
                f"--prompts needs a tokenizer: no {TOKENIZER_FILE} in {build_dir} or the model's folder"
            )
        ids = torch.randint(3, config.vocab_size, (RANDOM_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        prompts = [
            (f"{n} tokens", stream(ids[i * 7 :], n)) for i, n in enumerate(default_prompt_lengths(config, quick))
        ]
        return Texts(prompts, ids, "random token ids (no tokenizer.json in the build folder or the model's folder)")
    tokenizer = load_tokenizer(folder)
    heldout = tokenizer.encode(HELDOUT_FILE.read_text())
    if prompts_file is not None:
        encoded = [tokenizer.encode(p) for p in read_prompts(prompts_file)]
        prompts = [(f"prompt {i + 1} ({len(ids)} tokens)", ids) for i, ids in enumerate(encoded)]
    else:
        # Prompts of several lengths from different places of the held-out text, each starting with BOS.
        body = heldout[1:]
        prompts = []
        for i, n in enumerate(default_prompt_lengths(config, quick)):
            offset = i * len(body) // 4
            prompts.append((f"{n} tokens", stream(heldout[:1] + body[offset:] + body[:offset], n)))
    too_large = max(max(ids) for _, ids in prompts + [("held-out", heldout)])
    if too_large >= config.vocab_size:
        raise MistralExportError(
            f"{folder / TOKENIZER_FILE}: token id {too_large} is outside the model's vocabulary "
            f"({config.vocab_size}); the tokenizer belongs to another model"
        )
    return Texts(prompts, heldout, str(folder / TOKENIZER_FILE))
