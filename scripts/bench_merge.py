#!/usr/bin/env python3
"""Benchmark `hivemerge merge` against the I/O floor and mergekit, side by side in one run.

What it does, in order:

1. Builds (once; cached under --workdir/models) a synthetic ~220M-parameter Llama in fp16
   safetensors -- hidden 1024, intermediate 2816, 12 layers, vocab 32000, 16 heads,
   untied LM head -- plus three "experts", each the base plus seeded N(0, 0.002) noise,
   so every task vector is nonzero. Each directory has config.json and a small
   word-level tokenizer (mergekit copies the base's tokenizer; hivemerge does too).
2. Writes a TIES recipe (density 0.5, weights 1.0, 1.0 and a mild gradient [0.9, 1.1],
   or 1.0 with --no-gradient; dtype float32, out_dtype float16), which both tools read
   as written. --method dare_ties merges the same recipe with DARE's random drop
   instead of TIES's magnitude trim: its masks are hivemerge's keyed hash, so its output
   is not expected to equal mergekit's; so does --method della (DELLA's magnitude-ranked
   drop, epsilon 0.15). --method sce merges the experts with SCE (select_topk 0.5, no
   per-model density), which both tools compute deterministically.
3. Reads every input file once (a warm-up: the OS page cache cannot be dropped without
   root, so all runs read from a warm cache instead, equally), then times each run in
   its own process under /usr/bin/time, which gives wall and CPU seconds and the peak
   RSS (ru_maxrss) of that process alone; a 10 ms sampler adds the peaks of its
   anonymous and file-backed resident memory (safetensors >= 0.6 hands out views of a
   memory map, so the input pages a merge touches count in its RSS as file pages):
     startup    (reference) a process that only imports torch and hivemerge
     io_floor   read every tensor of the 4 models (safetensors get_tensor, then a copy
                into a reused buffer so every byte is really read) and write an fp16
                output of the same layout with hivemerge's ShardedWriter; no math
     hivemerge  load_recipe + run_merge(device="cpu") in a fresh process, as `hivemerge
                merge recipe.yaml --out ... --device cpu` does (--cli: run that command)
     hivemerge_cuda  the same with device="cuda" (--device cuda or both; with both, the
                two outputs must be byte-identical, as every node of a round needs)
     mergekit   `mergekit-yaml recipe.yaml OUT --lazy-unpickle --device cpu` (0.1.5, own
                venv; default --out-shard-size 5B parameters, i.e. one shard here)
4. Prints wall and CPU seconds and peak memory per run, the ratios against the goals
   (hivemerge wall <= 4x the I/O floor and <= 0.25x mergekit; peak RSS <= 0.5x
   mergekit), and how far hivemerge's output is from mergekit's (per-tensor max |diff|
   in fp32 and the fraction of elements that differ). The machine's load average is
   shown per run: on a shared machine other processes inflate wall times, and
   multi-threaded torch runs suffer most (compare --threads 1).

mergekit is only run with --with-mergekit; the first such run creates the venv
(--workdir/../mergekit-venv by default) with `pip install torch==2.13.0` first (so pip
takes the CPU wheel, not a CUDA build), then `pip install mergekit==0.1.5`.

Usage:
    python scripts/bench_merge.py                   # I/O floor and hivemerge only
    python scripts/bench_merge.py --with-mergekit   # all three, plus the output diff
    python scripts/bench_merge.py --device both     # on a GPU machine: CPU and CUDA runs, bytes compared
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
MODEL_NAMES = ("base", "expert1", "expert2", "expert3")
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"

# The synthetic model: ~220M parameters.
LLAMA = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    vocab_size=32000,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
NOISE = 0.002  # std of each expert's perturbation
MODEL_VERSION = 2  # bump when the generator changes, to rebuild cached models

RECIPE = """\
merge_method: {method}
base_model: {base}
models:
  - model: {expert1}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {expert2}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {expert3}
    parameters:
      weight: {expert3_weight}
      density: 0.5
parameters:
  normalize: true
dtype: float32
out_dtype: float16
"""

# Environment for every child: no hub access, same thread count for every tool.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------
# Child modes (run in fresh processes: the parent never imports torch, so it stays
# small and nothing it allocates can leak into a child's measurement).
# ---------------------------------------------------------------------------------


def child_generate(models_dir: Path) -> None:
    """Write base + 3 experts as fp16 safetensors with config.json and a tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA)
    config.dtype = torch.float16  # written to config.json
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture table from this
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    n_params = sum(_numel(s) for s in shapes.values())
    log(f"generating {len(shapes)} tensors, {n_params / 1e6:.1f}M parameters per model")

    gen = torch.Generator().manual_seed(1234)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = torch.ones(shape, dtype=torch.float16)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
    staging = models_dir.parent / (models_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save_model(staging / "base", base, config, save_file)
    for i, name in enumerate(MODEL_NAMES[1:], start=1):
        gen = torch.Generator().manual_seed(1000 + i)
        expert = {k: (v.float() + torch.randn(v.shape, generator=gen) * NOISE).to(torch.float16) for k, v in base.items()}
        _save_model(staging / name, expert, config, save_file)
        del expert
    (staging / "VERSION").write_text(f"{MODEL_VERSION}\n")
    shutil.rmtree(models_dir, ignore_errors=True)
    os.replace(staging, models_dir)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _save_model(directory: Path, tensors: dict, config, save_file) -> None:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    _save_tokenizer(directory)
    log(f"  wrote {directory.name}")


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(LLAMA["vocab_size"] - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(directory)


def child_io_floor(models_dir: Path, out_dir: Path, threads: int) -> None:
    """Read every tensor of every input, write an fp16 output of the same layout; no math.

    Reads through safetensors' memory maps (safe_open per file, get_tensor per tensor),
    so this process ends up with the inputs' touched pages mapped (its RSS counts them
    as file-backed pages); hivemerge reads the same bytes with plain reads instead."""
    import torch
    from safetensors import safe_open

    from hivemerge.merge.io.writer import ShardedWriter
    from hivemerge.merge.layers import natural_key

    if threads:
        torch.set_num_threads(threads)
    handles = [safe_open(str(models_dir / m / "model.safetensors"), framework="pt", device="cpu") for m in MODEL_NAMES]
    names = sorted(handles[0].keys(), key=natural_key)
    layout = []
    for name in names:
        sl = handles[0].get_slice(name)
        layout.append((name, torch.float16, tuple(sl.get_shape())))
    out_dir.mkdir(parents=True)
    writer = ShardedWriter(out_dir, layout)
    # safetensors >= 0.6 returns tensors that are views of a private memory map: nothing
    # is read until touched. Copying each into a reused buffer reads every byte once,
    # without the page faults of fresh allocations: the least work that reads it all.
    buffers = [torch.empty(0, dtype=torch.uint8) for _ in handles]
    for name, _, shape in layout:
        for i, h in enumerate(handles):
            tensor = h.get_tensor(name)
            if i == 0:
                dtype = tensor.dtype
            raw = tensor.reshape(-1).view(torch.uint8)
            if buffers[i].numel() < raw.numel():
                buffers[i] = torch.empty(raw.numel(), dtype=torch.uint8)
            buffers[i][: raw.numel()].copy_(raw)
        base = buffers[0][: raw.numel()].view(dtype).view(shape)
        writer.write(name, base.to(torch.float16))
    writer.finish()


def child_compare(a_dir: Path, b_dir: Path, result_file: Path) -> None:
    """Per-tensor max |a - b| (fp32) and count of differing elements; JSON to result_file."""
    import torch
    from safetensors import safe_open

    def open_all(d: Path) -> dict:
        where = {}
        for f in sorted(d.glob("*.safetensors")):
            h = safe_open(str(f), framework="pt", device="cpu")
            for k in h.keys():
                where[k] = h
        return where

    a, b = open_all(a_dir), open_all(b_dir)
    out = {"only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)), "tensors": {}}
    for name in sorted(set(a) & set(b)):
        x, y = a[name].get_tensor(name), b[name].get_tensor(name)
        entry = {"dtype_a": str(x.dtype), "dtype_b": str(y.dtype), "shape_a": list(x.shape), "shape_b": list(y.shape)}
        if x.shape == y.shape:
            d = (x.float() - y.float()).abs()
            entry.update(
                numel=x.numel(),
                max_abs=float(d.max()) if x.numel() else 0.0,
                differ=int((d > 0).sum()),
                bit_equal=bool(torch.equal(x, y)),
            )
        out["tensors"][name] = entry
    result_file.write_text(json.dumps(out))


def child_hivemerge(recipe: Path, out_dir: Path, threads: int, device: str) -> None:
    """What `hivemerge merge RECIPE --out OUT --device DEVICE --threads N` does, minus the progress bar."""
    import torch

    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.recipe import load_recipe

    if threads:
        torch.set_num_threads(threads)
    result = run_merge(load_recipe(recipe), out_dir, device=device)
    print(f"merged {result.tensors} tensors on {result.device} in {result.seconds:.2f}s (in-process)")


def child_startup() -> None:
    import torch  # noqa: F401

    import hivemerge.merge.engine  # noqa: F401


# ---------------------------------------------------------------------------------
# The orchestrator.
# ---------------------------------------------------------------------------------


class Run:
    def __init__(self, label: str, seconds: float, cpu: float, peak_mib: float, rc: int, tail: str, load: float):
        self.label, self.seconds, self.cpu, self.peak_mib, self.rc, self.tail = label, seconds, cpu, peak_mib, rc, tail
        self.load = load  # 1-minute load average just before the run


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _rss_parts(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of pid and its descendants, now."""
    anon = file = 0
    for p in _descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("RssFile:"):
                        file += int(line.split()[1])
        except OSError:
            pass
    return anon, file


class Sampler(threading.Thread):
    """Polls the anonymous and file-backed RSS of a process tree every few ms: the
    kernel keeps only the high-water mark of their sum (ru_maxrss), and the file-backed
    part (memory-mapped inputs, clean page cache) is not memory a merge allocated."""

    def __init__(self, pid: int, period: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_anon = self.peak_file = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            anon, file = _rss_parts(self.pid)
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self.done.wait(self.period)


def measure(label: str, cmd: list[str], env: dict | None = None, log_file: Path | None = None) -> Run:
    """Run cmd in a fresh process; wall seconds and that process's peak RSS."""
    full_env = dict(os.environ, **OFFLINE_ENV, **(env or {}))
    os.sync()  # flush earlier runs' dirty pages so no run pays for another's writeback
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        time_file = Path(tf.name)
    timer = shutil.which("time") or "/usr/bin/time"
    use_time = Path(timer).is_file() and os.access(timer, os.X_OK)
    load = loadavg()
    started = time.perf_counter()
    if use_time:
        # A small fork+exec'd /usr/bin/time reports its own child's rusage only.
        proc = subprocess.Popen([timer, "-f", "%M %U %S", "-o", str(time_file), *cmd], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        output, _ = proc.communicate()
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        rc = proc.returncode
        lines = [l for l in time_file.read_text().splitlines() if l.strip()]
        try:
            kib, user, system = lines[-1].split()
            peak_kib, cpu = int(kib), float(user) + float(system)
        except (IndexError, ValueError):
            peak_kib, cpu = -1, -1.0
    else:  # no /usr/bin/time: wait4 on the child directly
        p = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(p.pid)
        sampler.start()
        output = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        peak_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    time_file.unlink(missing_ok=True)
    if log_file is not None:
        log_file.write_text(output)
    tail = "\n".join(output.strip().splitlines()[-15:])
    if rc != 0:
        log(f"{label}: FAILED (exit {rc}); last output:\n{tail}")
    else:
        log(f"{label}: {seconds:.2f} s wall, {cpu:.2f} s CPU, peak RSS {peak_kib / 1024:.0f} MiB "
            f"(sampled peaks: anon {sampler.peak_anon / 1024:.0f} MiB, file-backed {sampler.peak_file / 1024:.0f} MiB; "
            f"load before: {load:.2f})")
    run = Run(label, seconds, cpu, peak_kib / 1024, rc, tail, load)
    run.anon_mib, run.file_mib = sampler.peak_anon / 1024, sampler.peak_file / 1024
    return run


def ensure_models(models_dir: Path) -> None:
    version = models_dir / "VERSION"
    if version.is_file() and version.read_text().strip() == str(MODEL_VERSION) and all(
        (models_dir / m / "model.safetensors").is_file() for m in MODEL_NAMES
    ):
        log(f"reusing cached models in {models_dir}")
        return
    log(f"building synthetic models in {models_dir} (one-off)")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(SCRIPT), "_generate", str(models_dir)], check=True, env=dict(os.environ, **OFFLINE_ENV))
    log(f"models built in {time.perf_counter() - started:.1f} s")


def ensure_mergekit(venv: Path) -> Path:
    """A venv with mergekit==0.1.5 (torch installed first so pip takes the CPU wheel)."""
    py = venv / "bin" / "python"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file():
        got = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"], capture_output=True, text=True)
        if got.stdout.strip() == MERGEKIT_VERSION:
            log(f"reusing mergekit {MERGEKIT_VERSION} in {venv}")
            return exe
    log(f"installing mergekit {MERGEKIT_VERSION} into {venv} (one-off)")
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    if subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"]).returncode != 0:
        # Its pins conflict with this environment: install it bare, then the
        # dependencies it needs at run time, unpinned.
        log("mergekit's pinned dependencies did not resolve; retrying with --no-deps plus its runtime deps")
        subprocess.run([*pip, "--no-deps", f"mergekit=={MERGEKIT_VERSION}"], check=True)
        deps = ["tqdm", "click", "safetensors", "accelerate", "pydantic", "immutables", "transformers", "tokenizers",
                "huggingface_hub", "peft", "typing-extensions", "sentencepiece", "protobuf", "scipy", "datasets"]
        subprocess.run([*pip, *deps], check=True)
    return exe


def warm_cache(models_dir: Path) -> None:
    total = 0
    started = time.perf_counter()
    for f in sorted(models_dir.rglob("*")):
        if f.is_file():
            with f.open("rb", buffering=0) as fh:
                while chunk := fh.read(16 << 20):
                    total += len(chunk)
    log(f"warm-up: read {total / 2**30:.2f} GiB of inputs in {time.perf_counter() - started:.1f} s; "
        "all runs below read from the page cache (dropping it needs root), equally")


def file_digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*.safetensors"))


def summarize_diff(result: dict) -> list[str]:
    tensors = result["tensors"]
    lines = []
    if result["only_a"] or result["only_b"]:
        lines.append(f"  tensor names differ: only hivemerge {result['only_a'][:5]}, only mergekit {result['only_b'][:5]}")
    mismatched = [n for n, e in tensors.items() if "max_abs" not in e]
    if mismatched:
        lines.append(f"  shapes differ for {len(mismatched)} tensors, e.g. {mismatched[:3]}")
    dtypes = {(e["dtype_a"], e["dtype_b"]) for e in tensors.values()}
    lines.append(f"  dtypes (hivemerge, mergekit): {sorted(dtypes)}")
    compared = {n: e for n, e in tensors.items() if "max_abs" in e}
    numel = sum(e["numel"] for e in compared.values())
    differ = sum(e["differ"] for e in compared.values())
    equal = sum(e["bit_equal"] for e in compared.values())
    worst = max(compared.items(), key=lambda kv: kv[1]["max_abs"]) if compared else None
    lines.append(f"  tensors compared: {len(compared)}, bit-identical: {equal}")
    lines.append(f"  elements that differ: {differ} of {numel} ({100 * differ / max(numel, 1):.4f}%)")
    if worst:
        lines.append(f"  max |diff| overall: {worst[1]['max_abs']:.3e} (in {worst[0]})")

    def group(name: str) -> str:
        if "layers." in name:
            return "layers.*." + name.split("layers.", 1)[1].split(".", 1)[1]
        return name

    groups: dict[str, list] = {}
    for n, e in compared.items():
        groups.setdefault(group(n), []).append(e)
    lines.append(f"  {'tensor (group)':44} {'max |diff|':>11} {'differ %':>10}")
    for g, es in sorted(groups.items()):
        m = max(e["max_abs"] for e in es)
        frac = sum(e["differ"] for e in es) / max(sum(e["numel"] for e in es), 1)
        lines.append(f"  {g:44} {m:11.3e} {100 * frac:10.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):  # a child mode
        mode, rest = argv[0], argv[1:]
        if mode == "_generate":
            child_generate(Path(rest[0]))
        elif mode == "_io_floor":
            child_io_floor(Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif mode == "_hivemerge":
            child_hivemerge(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3])
        elif mode == "_compare":
            child_compare(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        elif mode == "_startup":
            child_startup()
        else:
            raise SystemExit(f"unknown child mode {mode}")
        return 0

    parser = argparse.ArgumentParser(
        prog="bench_merge.py",
        description=(
            "Time `hivemerge merge` (TIES, 3 experts, ~220M-parameter synthetic Llama, fp32 math, fp16 files) "
            "against the I/O floor (read all inputs, write the output, no math) and, with --with-mergekit, "
            "against mergekit 0.1.5 on the same recipe. Each run is its own process; wall time and peak RSS "
            "are per process. Prints a table, the ratios against the goals (wall <= 4x I/O floor and "
            "<= 0.25x mergekit, peak RSS <= 0.5x mergekit) and how far hivemerge's output is from mergekit's."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "merge",
                        help="Work directory: cached models in WORKDIR/models, outputs in WORKDIR/out (git-ignored by default).")
    parser.add_argument("--with-mergekit", action="store_true",
                        help=f"Also run mergekit {MERGEKIT_VERSION} (installed on first use into --mergekit-venv: "
                             f"torch=={TORCH_VERSION} first, for the CPU wheel, then mergekit) and compare outputs.")
    parser.add_argument("--mergekit-venv", type=Path, default=None,
                        help="Virtual environment for mergekit (default: WORKDIR/../mergekit-venv).")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for every run (hivemerge --threads, mergekit --num-threads, torch in the I/O floor); "
                             "0 leaves each tool's default (all cores).")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Runs of each tool, interleaved; the table shows the fastest run's wall and CPU time, the median wall "
                             "time and the max peak RSS (the fastest run is the one least disturbed by other load).")
    parser.add_argument("--cli", action="store_true",
                        help="Run hivemerge through its command line (`python -m hivemerge merge ...`) instead of "
                             "calling hivemerge.merge.engine.run_merge in a fresh process (same work, no progress bar).")
    parser.add_argument("--method", choices=("ties", "dare_ties", "della", "sce"), default="ties",
                        help="The recipe's merge method (default: %(default)s).")
    parser.add_argument("--no-gradient", action="store_true",
                        help="Give expert3 weight 1.0 instead of the gradient [0.9, 1.1]. Tools that place the final norm "
                             "and LM head at different gradient positions (hivemerge: t=1; mergekit 0.1.5: t=0) then agree "
                             "there, and the output diff shows TIES tie-breaking alone.")
    parser.add_argument("--device", choices=("cpu", "cuda", "both"), default="cpu",
                        help="Where hivemerge merges. both: once on the CPU and once on CUDA, and checks that the two "
                             "outputs are byte-identical (the consensus every node computes depends on it). "
                             "mergekit always runs on the CPU.")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the merged outputs under WORKDIR/out (by default they are deleted; the cached models stay).")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available")

    workdir = args.workdir.resolve()
    models_dir = workdir / "models"
    out_root = workdir / "out"
    venv = (args.mergekit_venv or workdir.parent / "mergekit-venv").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    ensure_models(models_dir)
    mergekit_exe = ensure_mergekit(venv) if args.with_mergekit else None

    recipe = workdir / "recipe.yaml"
    weight3 = "1.0" if args.no_gradient else "[0.9, 1.1]    # a mild gradient over the layers"
    text = RECIPE.format(method=args.method, expert3_weight=weight3, **{m: str(models_dir / m) for m in MODEL_NAMES})
    if args.method == "sce":  # no per-model density or normalize: its own selection (select_topk) instead
        text = text.replace("      density: 0.5\n", "").replace("  normalize: true\n", "  select_topk: 0.5\n")
    recipe.write_text(text)
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    logs = out_root / "logs"
    logs.mkdir()

    warm_cache(models_dir)
    threads = args.threads
    if args.cli:
        def hivemerge_cmd(out: Path, device: str) -> list[str]:
            return [sys.executable, "-m", "hivemerge", "merge", str(recipe), "--device", device, "--threads", str(threads), "--out", str(out)]
    else:
        def hivemerge_cmd(out: Path, device: str) -> list[str]:
            return [sys.executable, str(SCRIPT), "_hivemerge", str(recipe), str(out), str(threads), device]
    # label -> device of each hivemerge run
    hivemerge_runs = {"cpu": {"hivemerge": "cpu"}, "cuda": {"hivemerge_cuda": "cuda"},
                      "both": {"hivemerge": "cpu", "hivemerge_cuda": "cuda"}}[args.device]
    runs: dict[str, list[Run]] = {"startup": [], "io_floor": [], "hivemerge": [], "hivemerge_cuda": [], "mergekit": []}
    for r in range(args.repeat):
        tag = f" (run {r + 1}/{args.repeat})" if args.repeat > 1 else ""
        suffix = f"-{r}" if args.repeat > 1 else ""
        log(f"startup{tag}: a process that imports torch and hivemerge, for reference")
        runs["startup"].append(measure("startup", [sys.executable, str(SCRIPT), "_startup"]))
        log(f"io_floor{tag}: read all 4 inputs, write fp16 output with ShardedWriter")
        out = out_root / f"io_floor{suffix}"
        runs["io_floor"].append(measure("io_floor", [sys.executable, str(SCRIPT), "_io_floor", str(models_dir), str(out), str(threads)],
                                        log_file=logs / f"io_floor{suffix}.log"))
        for label, device in hivemerge_runs.items():
            log(f"{label}{tag}: " + (f"hivemerge merge --device {device}" if args.cli else f"run_merge(load_recipe(...), device='{device}')"))
            out = out_root / f"{label}{suffix}"
            runs[label].append(measure(label, hivemerge_cmd(out, device), log_file=logs / f"{label}{suffix}.log"))
        if mergekit_exe:
            log(f"mergekit{tag}: mergekit-yaml --lazy-unpickle (CPU)")
            out = out_root / f"mergekit{suffix}"
            cmd = [str(mergekit_exe), str(recipe), str(out), "--lazy-unpickle", "--device", "cpu"]
            if threads:
                cmd += ["--num-threads", str(threads)]
            runs["mergekit"].append(measure("mergekit", cmd, log_file=logs / f"mergekit{suffix}.log"))
        if r + 1 < args.repeat:
            for name in ("io_floor", "hivemerge", "hivemerge_cuda", "mergekit"):
                shutil.rmtree(out_root / f"{name}{suffix}", ignore_errors=True)

    last = f"-{args.repeat - 1}" if args.repeat > 1 else ""
    same_bytes = None
    if args.device == "both" and runs["hivemerge"][-1].rc == 0 and runs["hivemerge_cuda"][-1].rc == 0:
        same_bytes = file_digests(out_root / f"hivemerge{last}") == file_digests(out_root / f"hivemerge_cuda{last}")
    diff_lines: list[str] = []
    if mergekit_exe and runs["mergekit"] and runs["mergekit"][-1].rc == 0 and runs["hivemerge"][-1].rc == 0:
        log("comparing hivemerge's output with mergekit's, tensor by tensor")
        result_file = out_root / "diff.json"
        subprocess.run([sys.executable, str(SCRIPT), "_compare", str(out_root / f"hivemerge{last}"), str(out_root / f"mergekit{last}"),
                        str(result_file)], check=True)
        diff_lines = summarize_diff(json.loads(result_file.read_text()))

    # ------------------------------------------------------------------ report
    def summary(label: str):
        """(wall, cpu) of the fastest run -- the least disturbed by other load -- and the max peak RSS."""
        rs = [r for r in runs[label] if r.rc == 0]
        if not rs:
            return None
        best = min(rs, key=lambda r: r.seconds)
        return (best.seconds, max(r.peak_mib for r in rs), best.cpu, statistics.median(r.seconds for r in rs),
                max(r.anon_mib for r in rs), max(r.file_mib for r in rs))

    n_params = sum(_numel(s) for s in _shapes_from_header(models_dir / "base" / "model.safetensors").values())
    in_gib = sum(dir_bytes(models_dir / m) for m in MODEL_NAMES) / 2**30
    print()
    print("=" * 78)
    print(f"hivemerge merge benchmark: {args.method} (density 0.5), base + 3 experts, {n_params / 1e6:.1f}M params each, "
          f"fp16 files, fp32 math")
    first_out = out_root / f"{next(iter(hivemerge_runs))}{last}"
    print(f"inputs {in_gib:.2f} GiB read, output {dir_bytes(first_out) / 2**30 if first_out.exists() else 0:.2f} GiB written; "
          f"CPU, {os.cpu_count()} cores, threads={threads or 'default'}; python {sys.version.split()[0]}")
    print("page cache: not dropped (needs root); one warm-up read of all inputs before the runs, so every run reads from cache")
    print("wall = whole process incl. interpreter start and imports; CPU = user+sys seconds of that process;")
    print("peak = its max resident set (ru_maxrss, what the goal is about); anon / file = sampled (10 ms) peaks of its")
    print("  anonymous memory and of its file-backed pages (memory-mapped inputs: clean page cache, counted in RSS)")
    if args.repeat > 1:
        print(f"{args.repeat} interleaved runs each: wall and CPU of the fastest run (least disturbed), median wall, max peak RSS")
    print("-" * 78)
    print(f"{'run':10} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'anon':>6} {'file':>6} {'load':>5}  note")
    notes = {
        "startup": "python + import torch, hivemerge; nothing else",
        "io_floor": "get_tensor x4 models, copied out; ShardedWriter; no math",
        "hivemerge": "hivemerge merge --device cpu" if args.cli else "engine.run_merge(device='cpu'), fresh process",
        "hivemerge_cuda": "hivemerge merge --device cuda" if args.cli else "engine.run_merge(device='cuda'), fresh process",
        "mergekit": f"mergekit-yaml {MERGEKIT_VERSION} --lazy-unpickle, cpu",
    }
    for label in ("startup", "io_floor", "hivemerge", "hivemerge_cuda", "mergekit"):
        if label.startswith("hivemerge") and label not in hivemerge_runs:
            continue
        if label == "mergekit" and not mergekit_exe:
            print(f"{label:10} {'-':>8} {'-':>8} {'-':>9} {'-':>6} {'-':>6} {'-':>5}  not run (pass --with-mergekit)")
            continue
        s = summary(label)
        if s is None:
            print(f"{label:10} {'FAILED':>8} {'-':>8} {'-':>9} {'-':>6} {'-':>6} {'-':>5}  see {logs}")
            continue
        load = max(r.load for r in runs[label])
        med = f"; median wall {s[3]:.2f}" if args.repeat > 1 else ""
        print(f"{label:10} {s[0]:8.2f} {s[2]:8.2f} {s[1]:9.0f} {s[4]:6.0f} {s[5]:6.0f} {load:5.2f}  {notes[label]}{med}")
    print("-" * 78)
    hm, io, mk = summary("hivemerge"), summary("io_floor"), summary("mergekit")

    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    if hm and io:
        r = hm[0] / io[0]
        print(f"hivemerge / io_floor   wall: {r:6.2f}x   (goal <= 4x)     {verdict(r <= 4):6}  CPU: {hm[2] / io[2]:6.2f}x")
    gpu = summary("hivemerge_cuda")
    if gpu and io:
        print(f"hivemerge_cuda / io_floor wall: {gpu[0] / io[0]:6.2f}x  (includes CUDA start-up)")
    if gpu and hm:
        print(f"hivemerge_cuda / hivemerge (cpu) wall: {gpu[0] / hm[0]:6.2f}x")
    if same_bytes is not None:
        print(f"cpu and cuda outputs byte-identical: {'yes' if same_bytes else 'NO'}")
    if hm and mk:
        r = hm[0] / mk[0]
        print(f"hivemerge / mergekit   wall: {r:6.2f}x   (goal <= 0.25x)  {verdict(r <= 0.25):6}  CPU: {hm[2] / mk[2]:6.2f}x")
        r = hm[1] / mk[1]
        print(f"hivemerge / mergekit   peak: {r:6.2f}x   (goal <= 0.5x)   {verdict(r <= 0.5):6}  anon: {hm[4] / max(mk[4], 1e-9):6.2f}x")
    elif mergekit_exe:
        print("mergekit ratios: unavailable (a run failed)")
    loads = [r.load for rs in runs.values() for r in rs]
    if loads and max(loads) > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: 1-minute load average was up to {max(loads):.2f} on {os.cpu_count()} cores before a run: other "
              "processes competed for the CPU and wall times are inflated (multi-threaded runs most); compare CPU seconds, "
              "or use --repeat / --threads 1")
    if diff_lines:
        print("-" * 78)
        print("hivemerge output vs mergekit output (fp32 |hivemerge - mergekit|):")
        for line in diff_lines:
            print(line)
    print("=" * 78)

    failed = [r for rs in runs.values() for r in rs if r.rc != 0]
    if args.keep:
        log(f"outputs kept under {out_root}")
    else:
        shutil.rmtree(out_root, ignore_errors=True)
        log(f"removed outputs under {out_root} (cached models kept in {models_dir}; --keep to keep outputs)")
    return 1 if failed or same_bytes is False else 0


def _shapes_from_header(path: Path) -> dict:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["shape"] for k, v in header.items()}


if __name__ == "__main__":
    sys.exit(main())
