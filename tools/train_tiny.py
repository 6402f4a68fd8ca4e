"""Train the tiny fixture model (the embedded default `tiny`) on the Python standard library's sources.

Seeded and reproducible; a few minutes on 2 CPU cores. Writes a Hugging Face layout folder
(config.json, model.safetensors in fp16, tokenizer.json, README.md with held-out perplexity).

    python tools/train_tiny.py --out mistral_export/model/fixtures/tiny
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mistral_export.model.checkpoint import save_hf_checkpoint
from mistral_export.model.config import ModelConfig
from mistral_export.model.tokenizer import BOS, EOS, TextTokenizer
from mistral_export.model.transformer import Transformer

CONFIG = ModelConfig(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    sliding_window=64,
    max_context=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    name="tiny",
)
SEQ_LEN = 4 * CONFIG.sliding_window  # long enough that the window matters
HELD_OUT_EVERY = 10  # every 10th file is held out


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    files = [p for p in sorted(root.rglob("*.py")) if not set(p.relative_to(root).parts) & set(skip)]
    return [p for p in files if 2_000 < p.stat().st_size < 200_000]


def read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG.vocab_size,
        special_tokens=["<unk>", BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_stream(tokenizer: TextTokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.int64)


@torch.no_grad()
def perplexity(model: Transformer, stream: torch.Tensor, windows: int = 64) -> float:
    """exp(mean NLL) over consecutive SEQ_LEN windows of the held-out stream."""
    usable = min(windows, (len(stream) - 1) // SEQ_LEN)
    starts = torch.arange(usable) * SEQ_LEN
    x = torch.stack([stream[s : s + SEQ_LEN] for s in starts])
    y = torch.stack([stream[s + 1 : s + SEQ_LEN + 1] for s in starts])
    total = 0.0
    for i in range(0, usable, 16):
        logits, _ = model(x[i : i + 16])
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i : i + 16].flatten(), reduction="sum").item()
    return math.exp(total / y.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    files = stdlib_files()
    train_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY]
    held_files = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0]
    raw = train_tokenizer(read(train_files))
    tokenizer = TextTokenizer(raw)
    train = token_stream(tokenizer, read(train_files))
    held = token_stream(tokenizer, read(held_files))
    print(
        f"{len(train_files)} training files ({len(train):,} tokens), {len(held_files)} held out ({len(held):,} tokens)"
    )

    model = Transformer(CONFIG)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    started = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - SEQ_LEN - 1, (args.batch,), generator=generator)
        x = torch.stack([train[s : s + SEQ_LEN] for s in starts])
        y = torch.stack([train[s + 1 : s + SEQ_LEN + 1] for s in starts])
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - started:6.0f}s", flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(model, args.out, dtype=torch.float16)
    raw.save(str(args.out / "tokenizer.json"))
    # Perplexity of the weights as shipped (fp16), evaluated in fp32.
    shipped = Transformer(CONFIG)
    shipped.load_state_dict({n: p.to(torch.float16).float() for n, p in model.state_dict().items()})
    ppl = perplexity(shipped.eval(), held)
    minutes = (time.time() - started) / 60
    print(f"held-out perplexity {ppl:.2f} (uniform baseline {CONFIG.vocab_size})")
    write_card(args, ppl, len(train), len(held), minutes)


def write_card(args, ppl: float, train_tokens: int, held_tokens: int, minutes: float) -> None:
    c = CONFIG
    (args.out / "README.md").write_text(f"""# tiny: the embedded fixture model of mistral-export

A Mistral-architecture model (RMSNorm, RoPE, GQA, sliding window, SwiGLU) small enough to ship
inside the package, trained by `tools/train_tiny.py` (seed {args.seed}, {args.steps} steps of batch
{args.batch} x {SEQ_LEN} tokens, {minutes:.0f} min on 2 CPU cores) on the Python standard library's own
sources, which every machine has offline. It exists so that every stage of the pipeline can be tested
on real, trained weights whose attention depends on the window.

| | |
| --- | --- |
| layers / hidden / intermediate | {c.num_layers} / {c.hidden_size} / {c.intermediate_size} |
| query heads / KV heads / head_dim | {c.num_heads} / {c.num_kv_heads} / {c.head_dim} |
| sliding window (W) | {c.sliding_window} (trained on sequences of {SEQ_LEN} = 4W) |
| vocabulary | {c.vocab_size} byte-level BPE tokens (`tokenizers`) |
| weights | fp16, {c.parameter_count():,} parameters |
| training tokens | {train_tokens:,} (every file except each {HELD_OUT_EVERY}th) |
| held-out tokens | {held_tokens:,} (each {HELD_OUT_EVERY}th file) |
| **held-out perplexity** | **{ppl:.2f}** (uniform baseline: {c.vocab_size}) |
""")


if __name__ == "__main__":
    main()
