#!/usr/bin/env python
"""Benchmark of the delta codecs on a tiny expert that was really fine-tuned.

A tiny Llama base is pretrained on a mix of synthetic tasks, then an expert is
fine-tuned from it on multi-digit addition. For each codec the script extracts the
signed delta, rebuilds the expert, and reports side by side, in one run:
bytes versus the fp16 full model, encode and decode time, and the change of the
expert's held-out loss after apply. ``lowrank:rank=R`` is a truncated SVD of each
matrix. Last, the same task is learnt as a PEFT LoRA adapter (``--adapter-rank``, all
linear layers; needs peft) and published as its factors: that delta's size, and its
rebuilt expert's loss next to the adapter's own and the full fine-tune's. Goal (issue 3): a default lossy codec at least
10x smaller than the fp16 model whose rebuilt expert loses at most 1% relative
held-out loss, and ``lossless`` bit-exact.

    python scripts/bench_delta.py [--workdir .bench/delta] [--steps 400] [--hidden 256] [--codecs ...]
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch

from hivemerge.merge.deltas.codecs import DEFAULT_CODEC
from hivemerge.merge.deltas.delta import apply_delta, extract_delta
from hivemerge.protocol.identity import Identity

CODECS = ["lossless", "fp16", "int8", "sparse", "sparse:density=0.05,values=int8", "sparse:select=dare,density=0.2", "sign1",
          "sign1:block=64", "ternary", "ternary:threshold=0.7", "lowrank:rank=8", "lowrank:rank=32", "lowrank:rank=128"]


def addition(rng: random.Random) -> str:
    a, b = rng.randint(0, 9999), rng.randint(0, 9999)
    return f"{a}+{b}={a + b}\n"


def reverse(rng: random.Random) -> str:
    s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
    return f"rev {s}={s[::-1]}\n"


def encode(texts: list[str], length: int) -> torch.Tensor:
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [min(ord(c), 127) for c in t][:length]
        ids[i, : len(codes)] = torch.tensor(codes)
    return ids


def train(model, make, steps: int, seed: int, lr: float) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = encode([make(rng) for _ in range(32)], 24)
        loss = model(input_ids=batch, labels=torch.where(batch == 0, -100, batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"    step {step:4d} loss {loss.item():.3f}", flush=True)


def held_out_loss(model_dir: Path, data: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=data, labels=torch.where(data == 0, -100, data)).loss.item()


def build_models(work: Path, steps: int, hidden: int, layers: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, expert_dir = work / "base", work / "expert-add"
    if (base_dir / "config.json").exists() and (expert_dir / "config.json").exists():
        print("reusing cached base and expert")
        return base_dir, expert_dir
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    print("pretraining the base on a task mix")
    mix = lambda rng: addition(rng) if rng.random() < 0.5 else reverse(rng)  # noqa: E731
    train(model, mix, steps, seed=1, lr=3e-3)
    model.to(torch.float16).save_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    print("fine-tuning the addition expert")
    train(model, addition, steps, seed=2, lr=1e-3)
    model.to(torch.float16).save_pretrained(expert_dir)
    return base_dir, expert_dir


def build_adapter(work: Path, base_dir: Path, steps: int, rank: int) -> Path:
    """A LoRA adapter of every linear layer, trained on the expert's task (as the expert was)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    adapter_dir = work / f"adapter-add-r{rank}"
    if (adapter_dir / "adapter_config.json").exists():
        return adapter_dir
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    print(f"training a rank-{rank} LoRA adapter on addition")
    train(model, addition, steps, seed=2, lr=3e-3)
    model.save_pretrained(adapter_dir)
    return adapter_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/delta"))
    parser.add_argument("--steps", type=int, default=400, help="training steps for the base and for the expert")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny Llama (7 MB in fp16 at 256)")
    parser.add_argument("--layers", type=int, default=4, help="number of layers of the tiny Llama")
    parser.add_argument("--codecs", nargs="+", default=CODECS, help="codec specs to compare (NAME or NAME:key=value,...)")
    parser.add_argument("--adapter-rank", type=int, default=16, help="rank of the LoRA adapter published as a delta (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir / f"h{args.hidden}-l{args.layers}-s{args.steps}"
    work.mkdir(parents=True, exist_ok=True)
    base_dir, expert_dir = build_models(work, args.steps, args.hidden, args.layers)
    data = encode([addition(random.Random(10_000 + i)) for i in range(512)], 24)  # held out: other seeds
    base_loss = held_out_loss(base_dir, data)
    expert_loss = held_out_loss(expert_dir, data)
    full_bytes = (expert_dir / "model.safetensors").stat().st_size
    print(f"\nfp16 full expert: {full_bytes:,} bytes; held-out addition loss: base {base_loss:.4f}, expert {expert_loss:.4f}\n")

    identity = Identity.generate()
    rows = []
    for codec in args.codecs:
        delta = args.workdir / "delta.safetensors"
        rebuilt = args.workdir / "rebuilt"
        t0 = time.perf_counter()
        report = extract_delta(base_dir, expert_dir, delta, identity, codec)
        t1 = time.perf_counter()
        summary = apply_delta(base_dir, delta, rebuilt, overwrite=True)
        t2 = time.perf_counter()
        loss = held_out_loss(rebuilt, data)
        rows.append((codec, report.bytes, full_bytes / report.bytes, t1 - t0, t2 - t1, loss,
                     100 * (loss - expert_loss) / expert_loss, summary["exact"]))
        shutil.rmtree(rebuilt)
        delta.unlink()

    if args.adapter_rank:
        adapter_dir = build_adapter(work, base_dir, args.steps, args.adapter_rank)
        delta, rebuilt = args.workdir / "delta.safetensors", args.workdir / "rebuilt"
        t0 = time.perf_counter()
        report = extract_delta(base_dir, adapter_dir, delta, identity)
        t1 = time.perf_counter()
        summary = apply_delta(base_dir, delta, rebuilt, overwrite=True)
        t2 = time.perf_counter()
        loss = held_out_loss(rebuilt, data)
        rows.append((f"LoRA r={args.adapter_rank} as its factors", report.bytes, full_bytes / report.bytes, t1 - t0, t2 - t1, loss,
                     100 * (loss - expert_loss) / expert_loss, summary["exact"]))
        shutil.rmtree(rebuilt)
        delta.unlink()

    header = f"{'codec':34} {'bytes':>10} {'x smaller':>9} {'encode s':>8} {'decode s':>8} {'loss':>8} {'Δloss %':>8} exact"
    print(header)
    print("-" * len(header))
    for codec, size, ratio, enc, dec, loss, rel, exact in rows:
        print(f"{codec:34} {size:>10,} {ratio:>9.1f} {enc:>8.2f} {dec:>8.2f} {loss:>8.4f} {rel:>+8.2f} {exact}")
    default = next((r for r in rows if r[0] == DEFAULT_CODEC), None)
    lossless = next((r for r in rows if r[0] == "lossless"), None)
    if default:
        print(f"\ndefault codec {DEFAULT_CODEC}: {default[2]:.1f}x smaller than fp16 (goal >= 10x), "
              f"held-out loss {default[6]:+.2f}% (goal <= +1%)")
    if lossless:
        print(f"lossless bit-exact: {lossless[7]}")
    print(f"(the fine-tuning gain being preserved: base {base_loss:.4f} -> expert {expert_loss:.4f}; the LoRA row's "
          "loss change is against the full fine-tune, and its delta rebuilds the adapter's merged expert exactly)")


if __name__ == "__main__":
    main()
