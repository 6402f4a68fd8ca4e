"""Mutation check of the op contract: every rule of DESIGN.md's contract, broken in each implementation, must make
a test fail.

Each mutation is a one-place text edit of the torch reference (model/ops.py), the ONNX bodies
(export/functions.py), the Triton kernels (plugins/kernels.py) or the AOT scalars (plugins/aot.py). The edits are
made in a scratch copy of the tracked files (the checkout is never touched); the tests run there, first unmutated
(they must pass), then once per mutation (one must fail). Prints a Markdown table: implementation, rule, mutation,
the failing test(s), or SURVIVED; `--out FILE` also writes it there with the git commit, command and versions.
Slow (the reference's mutations run the Hugging Face parity tests): about 25 minutes on 2 cores.

    .venv/bin/python tools/contract_mutations.py [--only ID ...] [--list] [--out benchmarks/results/contract_mutations.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import markdown as provenance_markdown
from provenance import provenance

OPS, BODIES = "mistral_export/model/ops.py", "mistral_export/export/functions.py"
KERNELS, AOT = "mistral_export/plugins/kernels.py", "mistral_export/plugins/aot.py"
# Test files per implementation, cheapest and most specific first (pytest stops at the first failure, -x), except
# for the kernels: all their interpreter cases run in one subprocess anyway, so every failing case is listed.
TESTS = {
    OPS: ["tests/test_ops_reference.py", "tests/test_model_parity.py", "tests/test_export_functions.py"],
    BODIES: ["tests/test_export_functions.py"],
    KERNELS: ["tests/test_kernels.py"],
    AOT: ["tests/test_aot_ptx.py"],
}
STOP_AT_FIRST = {OPS, BODIES, AOT}
IMPLEMENTATION = {OPS: "torch reference", BODIES: "ONNX body", KERNELS: "Triton kernel", AOT: "AOT scalars"}


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    rule: str
    old: str
    new: str
    count: int = 1  # occurrences of `old` (all are replaced)
    also: tuple[tuple[str, str], ...] = ()  # further (old, new) edits of the same mutation, one occurrence each

    def apply(self, text: str) -> str:
        edits = [(self.old, self.new, self.count), *((old, new, 1) for old, new in self.also)]
        for old, new, count in edits:
            if text.count(old) != count:
                raise SystemExit(
                    f"{self.id}: expected {count} occurrence(s) of {old!r} in {self.file}; the code changed"
                )
            text = text.replace(old, new)
        return text


GQA_BODY_IN = (  # as the formatter writes it
    "grouped = op.Reshape(\n"
    "        op.Cast(q, to=FLOAT.dtype), op.Concat(keep, kv_heads, op.Constant(value_ints=[-1]), keep, axis=0)\n"
    "    )"
)
GQA_BODY_OUT = "out = op.Reshape(op.MatMul(op.Softmax(op.Add(scores, bias), axis=-1), values), op.Shape(q))"

MUTATIONS = [
    # ---- torch reference
    Mutation(
        "ref-window-off-by-one",
        OPS,
        "window: j > p - W (W keys)",
        "allowed &= kp > qp - window",
        "allowed &= kp >= qp - window",
    ),
    Mutation("ref-causal", OPS, "causal: j <= p", "(kp <= qp)", "(kp <= qp + 1)"),
    Mutation(
        "ref-empty-slots",
        OPS,
        "empty slots (past_len < C) are not keys",
        "allowed = (kp >= 0) & (kp <= qp)",
        "allowed = kp <= qp",
    ),
    Mutation(
        "ref-cache-slot",
        OPS,
        "cached key j read from slot j mod C",
        "return last - torch.remainder(last - slots, capacity)",
        "return last - torch.remainder(last - slots + 1, capacity)",
    ),
    Mutation(
        "ref-post-update-cache",
        OPS,
        "attention reads the cache before this chunk's update",
        "old_pos = cache_positions(past_len, capacity)",
        "old_pos = cache_positions(past_len + seq, capacity)",
    ),
    Mutation(
        "ref-gqa",
        OPS,
        "GQA: query head h reads kv head h // G (mutated: h % Hkv)",
        "qg = q.float().reshape(batch, kv_heads, group * seq, head_dim)",
        "qg = q.float().view(batch, group, kv_heads, seq, head_dim).transpose(1, 2)"
        ".reshape(batch, kv_heads, group * seq, head_dim)",
        also=(
            (
                "return out.view(batch, q_heads, seq, head_dim).to(q.dtype)",
                "return out.view(batch, kv_heads, group, seq, head_dim).transpose(1, 2)"
                ".reshape(batch, q_heads, seq, head_dim).to(q.dtype)",
            ),
        ),
    ),
    Mutation(
        "ref-past-per-sequence",
        OPS,
        "past_len per sequence (attention)",
        "new_pos = past_len.to(torch.int64).unsqueeze(1)",
        "new_pos = past_len[:1].expand(batch).to(torch.int64).unsqueeze(1)",
    ),
    Mutation(
        "ref-fp32",
        OPS,
        "softmax accumulates in fp32 whatever the I/O type",
        "qg = q.float().reshape(",
        "qg = q.reshape(",
    ),
    Mutation("ref-no-window", OPS, "window 0 = no window", "if window != NO_WINDOW:", "if window is not None:"),
    Mutation(
        "ref-last-rows", OPS, "update keeps only the last min(S, C) rows", "kept = min(seq, capacity)", "kept = seq"
    ),
    Mutation(
        "ref-slot-arithmetic",
        OPS,
        "update writes slot (past_len + i) mod C",
        "past_len.to(torch.int64).unsqueeze(1) + rows, capacity)",
        "past_len.to(torch.int64).unsqueeze(1) + rows + 1, capacity)",
    ),
    Mutation(
        "ref-update-past-per-sequence",
        OPS,
        "past_len per sequence (update)",
        "past_len.to(torch.int64).unsqueeze(1) + rows, capacity)",
        "past_len[:1].expand(past_len.shape[0]).to(torch.int64).unsqueeze(1) + rows, capacity)",
    ),
    Mutation(
        "ref-update-keeps-other-slots",
        OPS,
        "update leaves every other slot as it was",
        "out = cache.clone()",
        "out = torch.zeros_like(cache)",
    ),
    # ---- ONNX bodies
    Mutation(
        "body-window-off-by-one",
        BODIES,
        "window: j > p - W (W keys)",
        "op.Greater(key_pos, op.Sub(query_pos, win))",
        "op.GreaterOrEqual(key_pos, op.Sub(query_pos, win))",
    ),
    Mutation(
        "body-causal",
        BODIES,
        "causal: j <= p",
        "op.LessOrEqual(key_pos, query_pos))",
        "op.LessOrEqual(key_pos, op.Add(query_pos, one)))",
    ),
    Mutation(
        "body-empty-slots",
        BODIES,
        "empty slots (past_len < C) are not keys",
        "allowed = op.And(op.GreaterOrEqual(key_pos, zero), op.LessOrEqual(key_pos, query_pos))",
        "allowed = op.LessOrEqual(key_pos, query_pos)",
    ),
    Mutation(
        "body-cache-slot",
        BODIES,
        "cached key j read from slot j mod C",
        "old_pos = op.Sub(last, op.Mod(op.Sub(last, slots), capacity))",
        "old_pos = op.Sub(last, op.Mod(op.Add(op.Sub(last, slots), one), capacity))",
    ),
    Mutation(
        "body-post-update-cache",
        BODIES,
        "attention reads the cache before this chunk's update",
        "last = op.Sub(start, one)",
        "last = op.Sub(op.Add(start, op.Squeeze(seq, [0])), one)",
    ),
    Mutation(
        "body-gqa",
        BODIES,
        "GQA: query head h reads kv head h // G (mutated: h % Hkv)",
        GQA_BODY_IN,
        "grouped = op.Reshape(op.Transpose(op.Reshape(op.Cast(q, to=FLOAT.dtype), op.Concat(keep, group, "
        "kv_heads, op.Shape(q, start=2), axis=0)), perm=[0, 2, 1, 3, 4]), op.Concat(keep, keep, "
        "op.Constant(value_ints=[-1]), op.Shape(q, start=3), axis=0))",
        also=(
            (
                GQA_BODY_OUT,
                "out = op.Reshape(op.Transpose(op.Reshape(op.MatMul(op.Softmax(op.Add(scores, "
                "bias), axis=-1), values), op.Concat(keep, keep, group, op.Shape(q, start=2), axis=0)), "
                "perm=[0, 2, 1, 3, 4]), op.Shape(q))",
            ),
        ),
    ),
    Mutation(
        "body-past-per-sequence",
        BODIES,
        "past_len per sequence (attention)",
        "start = op.Unsqueeze(past_len, [1])",
        "start = op.Unsqueeze(op.Expand(op.Slice(past_len, op.Constant(value_ints=[0]), "
        "op.Constant(value_ints=[1])), op.Shape(past_len)), [1])",
    ),
    Mutation(
        "body-fp32",
        BODIES,
        "softmax accumulates in fp32 whatever the I/O type",
        "keys = op.Concat(op.Cast(k_cache, to=FLOAT.dtype), op.Cast(k, to=FLOAT.dtype), axis=2)  # [B,Hkv,K,D]\n"
        "    values = op.Concat(op.Cast(v_cache, to=FLOAT.dtype), op.Cast(v, to=FLOAT.dtype), axis=2)",
        "keys = op.Concat(k_cache, k, axis=2)\n    values = op.Concat(v_cache, v, axis=2)",
    ),
    Mutation(
        "body-no-window",
        BODIES,
        "window 0 = no window",
        "in_window = op.Or(op.Equal(win, op.Constant(value_int=NO_WINDOW)), "
        "op.Greater(key_pos, op.Sub(query_pos, win)))",
        "in_window = op.Greater(key_pos, op.Sub(query_pos, win))",
    ),
    Mutation(
        "body-last-rows",
        BODIES,
        "update keeps only the last min(S, C) rows",
        "first = op.Max(op.Sub(seq, capacity), zero)",
        "first = zero",
    ),
    Mutation(
        "body-slot-arithmetic",
        BODIES,
        "update writes slot (past_len + i) mod C",
        "slots = op.Mod(op.Add(op.Unsqueeze(past_len, [1]), rows), capacity)",
        "slots = op.Mod(op.Add(op.Add(op.Unsqueeze(past_len, [1]), rows), op.Constant(value_int=1)), capacity)",
    ),
    Mutation(
        "body-update-past-per-sequence",
        BODIES,
        "past_len per sequence (update)",
        "slots = op.Mod(op.Add(op.Unsqueeze(past_len, [1]), rows), capacity)",
        "slots = op.Mod(op.Add(op.Unsqueeze(op.Expand(op.Slice(past_len, op.Constant(value_ints=[0]), "
        "op.Constant(value_ints=[1])), op.Shape(past_len)), [1]), rows), capacity)",
    ),
    Mutation(
        "body-update-keeps-other-slots",
        BODIES,
        "update leaves every other slot as it was",
        "return op.ScatterElements(cache, index, update, axis=2)",
        "return op.ScatterElements(op.Mul(cache, op.CastLike(op.Constant(value_float=0.0), cache)), index, "
        "update, axis=2)",
    ),
    # ---- Triton kernels (interpreter)
    Mutation(
        "kernel-window-off-by-one",
        KERNELS,
        "window: j > p - W (W keys)",
        "return tl.where(window == _NO_WINDOW, 0, pos - window + 1)",
        "return tl.where(window == _NO_WINDOW, 0, pos - window)",
    ),
    Mutation(
        "kernel-causal",
        KERNELS,
        "causal: j <= p (chunk kernel)",
        "(j[None, :] <= pos[:, None])",
        "(j[None, :] <= pos[:, None] + 1)",
    ),
    Mutation(
        "kernel-empty-slots",
        KERNELS,
        "empty slots (past_len < C) are not keys (decode kernel)",
        "lo = tl.maximum(tl.maximum(past - capacity, 0), _window_start(pos, window))",
        "lo = tl.maximum(past - capacity, _window_start(pos, window))",
    ),
    Mutation(
        "kernel-empty-slots-chunk",
        KERNELS,
        "empty slots (past_len < C) are not keys (chunk kernel)",
        "lo = tl.maximum(tl.maximum(past - capacity, 0), _window_start(past + first_i, window))",
        "lo = tl.maximum(past - capacity, _window_start(past + first_i, window))",
    ),
    Mutation(
        "kernel-cache-slot",
        KERNELS,
        "cached key j read from slot j mod C",
        "offs = cache_base + (j % ring)[:, None] * stride_cc",
        "offs = cache_base + ((j + 1) % ring)[:, None] * stride_cc",
        count=2,
    ),
    Mutation(
        "kernel-post-update-cache",
        KERNELS,
        "attention reads the cache before this chunk's update",
        "cache_end = tl.minimum(hi, past)",
        "cache_end = hi",
    ),
    Mutation(
        "kernel-gqa-decode",
        KERNELS,
        "GQA: query head h reads kv head h // G (decode kernel; mutated: h % Hkv)",
        "q_heads = kv_head * GROUP + offs_g",
        "q_heads = offs_g * kv_heads + kv_head",
        also=(("row = (b * kv_heads + kv_head) * GROUP + offs_g", "row = b * kv_heads * GROUP + q_heads"),),
    ),
    Mutation(
        "kernel-gqa-chunk",
        KERNELS,
        "GQA: query head h reads kv head h // G (chunk kernel; mutated: h % Hkv)",
        "q_heads = kv_head * GROUP + g\n",
        "q_heads = g * tl.num_programs(1) + kv_head\n",
    ),
    Mutation(
        "kernel-past-per-sequence",
        KERNELS,
        "past_len per sequence",
        "past = tl.load(past_len_ptr + b)\n",
        "past = tl.load(past_len_ptr)\n",
    ),
    Mutation(
        "kernel-fp32",
        KERNELS,
        "softmax accumulates in fp32 whatever the I/O type",
        "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)",
        "acc = (acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION))"
        ".to(v.dtype).to(tl.float32)",
    ),
    Mutation(
        "kernel-fp32-tile",
        KERNELS,
        "softmax accumulates in fp32 (one key tile's P·V in the I/O type)",
        "tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)",
        "tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(v.dtype)",
    ),
    Mutation(
        "kernel-fp32-scores",
        KERNELS,
        "softmax accumulates in fp32 (scores rounded to the I/O type)",
        "s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2",
        "s = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2).to(q.dtype).to(tl.float32)",
    ),
    Mutation(
        "kernel-no-window",
        KERNELS,
        "window 0 = no window",
        "return tl.where(window == _NO_WINDOW, 0, pos - window + 1)",
        "return pos - window + 1",
    ),
    Mutation(
        "kernel-last-rows",
        KERNELS,
        "update keeps only the last min(S, C) rows",
        "ok = (rows >= first) & (rows < seq_len)",
        "ok = rows < seq_len",
    ),
    Mutation(
        "kernel-slot-arithmetic",
        KERNELS,
        "update writes slot (past_len + i) mod C",
        "slots = (past + rows) % ring",
        "slots = (past + rows + 1) % ring",
    ),
    Mutation(
        "kernel-int32-positions",
        KERNELS,
        "int64 positions (past_len past 2^31 in the tests; the runners stop at 2^24 - 1)",
        "return (past - tl.maximum(past // ring - 1, 0) * ring).to(tl.int32)",
        "return past.to(tl.int32)",
    ),
    Mutation(
        "kernel-split-merge",
        KERNELS,
        "decode: partial softmaxes merged with their maxima",
        "w = tl.math.exp2(m - m_max)  # empty splits",
        'w = tl.where(m == float("-inf"), 0.0, 1.0)  #',
    ),
    Mutation(
        "aot-no-window",
        AOT,
        "window 0 = no window (the AOT scalar is the attribute as-is)",
        "seq, capacity, window]",
        "seq, capacity, window or (1 << 30)]",
    ),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def run_tests(tree: Path, files: list[str], stop_at_first: bool) -> tuple[int, list[str]]:
    """pytest's exit status and the failing test ids (FAILED/ERROR lines of its summary)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        *(["-x"] if stop_at_first else []),
        *files,
    ]
    proc = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="mutation ids (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--out", type=Path, help="also write the table (with its provenance) to this file")
    args = parser.parse_args()
    origin = provenance(("torch", "triton", "onnx", "onnxruntime", "onnxscript"))
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} {IMPLEMENTATION[m.file]:16s} {m.rule}")
        return
    with tempfile.TemporaryDirectory(prefix="contract_mutations_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        for file in sorted({m.file for m in chosen}):
            status, failed = run_tests(tree, TESTS[file], stop_at_first=False)
            if status != 0:
                sys.exit(f"unmutated tests fail for {file}: {failed or status}")
        rows = ["| implementation | rule | mutation | failing test |", "| --- | --- | --- | --- |"]
        print("\n".join(rows), flush=True)
        for m in chosen:
            original = (tree / m.file).read_text()
            (tree / m.file).write_text(m.apply(original))
            try:
                status, failed = run_tests(tree, TESTS[m.file], stop_at_first=m.file in STOP_AT_FIRST)
            finally:
                (tree / m.file).write_text(original)
            if status == 0:
                caught = "**SURVIVED**"
            elif failed:
                caught = ", ".join(f"`{t}`" for t in failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
            else:
                caught = f"pytest exit {status} (no test ran to a result)"
            rows.append(f"| {IMPLEMENTATION[m.file]} | {m.rule} | `{m.id}` | {caught} |")
            print(rows[-1], flush=True)
    if args.out:
        header = [
            "# Op contract mutations",
            "",
            provenance_markdown(origin),
            "Each rule of the op contract (DESIGN.md) broken in one implementation; the test(s) that fail.",
            "",
        ]
        args.out.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
