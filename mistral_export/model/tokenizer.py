"""Tokenizer loading: a Hugging Face `tokenizer.json`, or Mistral's native SentencePiece `tokenizer.model(.v3)`.

The runtime side (the runners, the Triton model) reads one format, `tokenizer.json` (the `tokenizers` library), so a
SentencePiece model is converted once, at build, into the same pipeline of `tokenizers` components: its model proto
is read by sentencepiece's own protobuf definitions (no hand-written parser); the pieces, scores and normalizer
options become a `tokenizers` BPE (or Unigram) model with byte fallback, the dummy-prefix and whitespace rules, and a
decoder that undoes them. `tokenizers` converts Unigram models itself but not BPE ones (Mistral's are BPE), and the
converter that does (transformers' convert_slow_tokenizer) is a test-only dependency here, hence this module.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from mistral_export.errors import MistralExportError
from mistral_export.files import written_atomically

BOS, EOS = "<s>", "</s>"
TOKENIZER_JSON = "tokenizer.json"
# In the order they are preferred when a folder has several.
SOURCES = (TOKENIZER_JSON, "tokenizer.model.v3", "tokenizer.model", "tekken.json")
SPACE = "\u2581"  # sentencepiece's visible space


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


def find_tokenizer_source(folder: Path) -> Path | None:
    """The tokenizer file of a checkpoint or build folder, or None."""
    for name in SOURCES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_tokenizer(path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json or a SentencePiece model file."""
    path = Path(path)
    if path.name == "tekken.json":
        raise MistralExportError(
            f"{path}: Mistral's tekken tokenizer is not supported yet; put the checkpoint's "
            f"{TOKENIZER_JSON} (Hugging Face layout) beside it"
        )
    if path.name == TOKENIZER_JSON:
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception subclasses
            raise MistralExportError(f"{path}: not a valid {TOKENIZER_JSON} ({exc})") from None
    return tokenizer_from_sentencepiece(path)


def load_tokenizer(folder: Path) -> TextTokenizer:
    source = find_tokenizer_source(folder)
    if source is None:
        raise MistralExportError(f"{folder}: no tokenizer found (expected one of {', '.join(SOURCES)})")
    return TextTokenizer(read_tokenizer(source))


def write_tokenizer_json(source: Path, target: Path) -> None:
    """TARGET (a tokenizer.json) from SOURCE, written under a temporary name and renamed when complete."""
    tokenizer = read_tokenizer(source)
    with written_atomically(target) as tmp:
        tokenizer.save(str(tmp))


def tokenizer_from_sentencepiece(path: Path) -> Tokenizer:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    proto = sp_model.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except DecodeError as exc:
        raise MistralExportError(f"{path}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise MistralExportError(f"{path}: not a SentencePiece model (no pieces)")
    piece_type = sp_model.ModelProto.SentencePiece
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[trainer.unk_id].piece
    if trainer.model_type == sp_model.TrainerSpec.BPE:
        model = models.BPE(
            vocab, _bpe_merges(proto, vocab), unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback
        )
    elif trainer.model_type == sp_model.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], trainer.unk_id, trainer.byte_fallback)
    else:
        raise MistralExportError(
            f"{path}: SentencePiece model type {trainer.model_type} is not supported (BPE or Unigram)"
        )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(norm)
    strip_prefix = [decoders.Strip(content=" ", left=1, right=0)] if norm.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip_prefix]
    )
    special = [p.piece for p in proto.pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    user = [p.piece for p in proto.pieces if p.type == piece_type.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=True) for t in user])
    return tokenizer


def _normalizer(norm) -> normalizers.Normalizer:
    """sentencepiece's normalization in its own order: character map, extra whitespace, dummy prefix, escaping."""
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _bpe_merges(proto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges in sentencepiece's priority order.

    sentencepiece's BPE repeatedly joins the adjacent pair whose joined piece has the highest score; a `tokenizers`
    BPE joins the pair of lowest merge rank. So every split of a mergeable piece into two vocabulary pieces is a
    merge, ranked by the joined piece's score (then by the halves' ids, for a stable order).
    """
    piece_type = type(proto.pieces[0]).Type
    ranked = []
    for piece in proto.pieces:
        if piece.type != piece_type.NORMAL or len(piece.piece) < 2:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
