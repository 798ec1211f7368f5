"""The chunked task-vector merge gives, bit for bit, what the whole-tensor formulation
gives: torch.where masks, the selection's float comparisons and tie rule, NaN and inf
included, whatever the chunk size."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import PEAK_RSS

from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.methods import METHODS, TensorJob, sparsify
from hivemerge.merge.numerics import exact, rng
from hivemerge.protocol.errors import UserInputError

N = 50_003  # not a multiple of any chunk size
WEIGHTS = [1.0, -0.5, 0.7]
DENSITIES = [0.37, 1.0, 0.2]


def reference_top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """The selection as first written: the k-th largest bit pattern as threshold, values
    compared as floats, ties kept by a running count."""
    flat = values.reshape(-1).float()
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = flat.view(torch.int32).sort(descending=True).values[k - 1].view(torch.float32)
    mask = flat > threshold
    need = k - int(mask.sum())
    at = flat == threshold
    if int(at.sum()) > need:
        at &= torch.cumsum(at, 0) <= need
    return mask | at


def l1_factor(delta: torch.Tensor, keep: torch.Tensor) -> float:
    """mergekit's rescale, summed exactly: sum|delta| / sum|kept| as float32 (1 where either is below 1e-7)."""
    total = math.fsum(delta.abs().double().tolist())
    kept = math.fsum(torch.where(keep, delta, 0.0).abs().double().tolist())
    return 1.0 if total < 1e-7 or kept < 1e-7 else float(torch.tensor(total / kept, dtype=torch.float32))


def reference_merge(method: str, job: TensorJob) -> torch.Tensor:
    """TaskVectorMerge on whole tensors with torch.where, as it was before chunking."""
    family = METHODS[method].family
    base = job.base.to(job.dtype).reshape(-1)
    weighted = []
    for model, params, model_id in zip(job.models, job.model_params, job.model_ids):
        delta = model.to(job.dtype).reshape(-1) - base
        density, n = params.get("density", 1.0), delta.numel()
        if family.sparsify is not None and density < 1.0:
            if family.sparsify == "random":
                keep = rng.bernoulli_mask(rng.stream_key(job.seed, job.name, model_id), n, density)
            else:
                target, skip = int(density * n), 0
                if family.sparsify == "magnitude":  # mergekit keeps at least one entry
                    target = max(1, target)
                if family.sparsify == "outliers":
                    skip = int(params["gamma"] * n)
                    skip += min(0, n - target - skip)
                keep = reference_top_k_mask(delta.abs(), skip + target) & ~reference_top_k_mask(delta.abs(), skip)
            factor = l1_factor(delta, keep) if job.params.get("rescale", False) else 1.0
            delta = torch.where(keep, delta, 0.0)
            if factor != 1.0:
                delta = delta * factor
        weighted.append(delta * params["weight"])
    if family.consensus:
        total = weighted[0]
        for d in weighted[1:]:
            total = total + d
        majority = torch.where(total >= 0, 1.0, -1.0).to(job.dtype)
        mixed = divisor = None
        for d, params in zip(weighted, job.model_params):
            agrees = torch.sign(d) == majority
            term, share = torch.where(agrees, d, 0.0), agrees.to(job.dtype) * params["weight"]
            mixed = term if mixed is None else mixed + term
            divisor = share if divisor is None else divisor + share
        divisor = torch.where(divisor == 0, 1.0, divisor).to(job.dtype)
    else:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed = mixed + d
        divisor = sum(p["weight"] for p in job.model_params)
    if job.params["normalize"]:
        mixed = mixed / divisor
    if job.params["lambda"] != 1:
        mixed = mixed * job.params["lambda"]
    return (base + mixed).to(job.out_dtype).view(job.base.shape)


def inputs(non_finite: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp16 base and experts whose task vectors take few distinct values: many ties."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(N, generator=g) * 0.05).half()
    models = [(base.float() + torch.round(torch.randn(N, generator=g) * 4) / 256).half() for _ in WEIGHTS]
    models[2][torch.rand(N, generator=g) < 0.3] = base[0]  # zeros in a task vector
    if non_finite:
        models[0][::997] = float("inf")
        models[0][5::1009] = float("nan")
        models[1][7::2003] = -float("inf")
    return base, models


def job_for(method: str, dtype: torch.dtype, non_finite: bool) -> TensorJob:
    base, models = inputs(non_finite)
    model_params = [{"weight": w, "density": d, "gamma": 0.05} for w, d in zip(WEIGHTS, DENSITIES)]
    # rescale of a task vector holding inf is NaN everywhere (sum|delta| is inf), which the engine refuses to write
    params = {"normalize": method != "task_arithmetic", "lambda": 1.3, "rescale": not non_finite}
    return TensorJob("w", base, models, model_params, params, dtype, torch.float16, model_ids=[0, 1, 2], seed=5)


METHOD_NAMES = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"]


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("non_finite", [False, True], ids=["finite", "inf-nan"])
def test_chunked_merge_matches_whole_tensor_formulation(monkeypatch, method, dtype, non_finite):
    want = reference_merge(method, job_for(method, dtype, non_finite))
    for chunk in (1 << 12, 1 << 18):
        monkeypatch.setattr(sparsify, "_CPU_CHUNK", chunk)
        got = METHODS[method].merge(job_for(method, dtype, non_finite))
        assert got.dtype == torch.float16
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (method, dtype, chunk)


def test_top_k_cuts_over_chunks_match_the_whole_selection():
    g = torch.Generator().manual_seed(4)
    values = torch.randint(0, 9, (10_001,), generator=g).float() / 8
    values[::101] = float("nan")
    values[3::211] = float("inf")
    pieces = [values[s : s + 777] for s in range(0, values.numel(), 777)]
    for k in (1, 50, 3333, 9000, 10_000):
        cut = exact.top_k_cuts(exact.Spans(lambda start, stop: values[start:stop], values.numel(), 777), [k])[0]
        got = torch.cat([cut.keep_bits(p, 777 * i) for i, p in enumerate(pieces)]).bool()
        assert torch.equal(got, reference_top_k_mask(values, k)), k
        assert torch.equal(exact.top_k_mask(values, k), reference_top_k_mask(values, k)), k


def test_get_reads_into_a_reused_buffer(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16), "c": torch.randn(2).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = SafetensorsModel(tmp_path)
    buffer = torch.empty(64, dtype=torch.uint8)
    for name, want in tensors.items():
        assert torch.equal(model.get(name), want)
        got = model.get(name, buffer)
        assert torch.equal(got, want) and got.data_ptr() == buffer.data_ptr()
    assert torch.equal(model.get("a", torch.empty(8, dtype=torch.uint8)), tensors["a"])  # too small: own memory


def test_get_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(100)}, str(tmp_path / "model.safetensors"))
    model = SafetensorsModel(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UserInputError, match="truncated"):
        model.get("a")


# -- the selection at scale (issue 21): no index arrays, unchanged tensors free ---------------

def grid_inputs(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16 base and three experts: one unchanged (its task vector is all zeros), one
    whose task vector takes four values (all ties), one ternary-like (about 58% zeros)."""
    g = torch.Generator().manual_seed(seed)
    n = 5003
    base = (torch.randn(n, generator=g) * 0.05).bfloat16()
    ties = (base.float() + torch.randint(-2, 2, (n,), generator=g) / 128).bfloat16()
    ternary = base.float() + torch.sign(torch.randn(n, generator=g)) * 0.01 * (torch.rand(n, generator=g) > 0.58)
    return base, [base.clone(), ties, ternary.bfloat16()]


RANKED = ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties"]
DENSITY_GRID = [0.01, 0.1, 0.3, 0.5, 0.58, 0.7, 0.9, 0.99, 0.999, 1.0, 0.42]
GAMMA_GRID = [0.0, 0.01, 0.05, 0.2, 0.5]


def test_220_recipes_select_exactly_as_the_whole_tensor_reference():
    """4 methods x 11 densities x 5 gammas = 220 recipes, on ties, zeros and an unchanged
    expert, each merged chunk by chunk with the streaming radix select and compared bit
    for bit with the sort-based reference."""
    count = 0
    for i, (method, density, gamma) in enumerate(
            (m, d, g) for m in RANKED for d in DENSITY_GRID for g in GAMMA_GRID):
        base, models = grid_inputs(i % 7)
        dtype = [torch.float32, torch.bfloat16][i % 2]
        model_params = [{"weight": w, "density": density, "gamma": gamma} for w in (0.6, 1.0, -0.4)]
        params = {"normalize": True, "lambda": 1.0, "rescale": True}
        job = TensorJob("w", base, models, model_params, params, dtype, torch.bfloat16, model_ids=[0, 1, 2], seed=5)
        got = METHODS[method].merge(job)
        want = reference_merge(method, job)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (method, density, gamma, dtype)
        count += 1
    assert count == 220


def test_an_unchanged_expert_costs_no_selection(monkeypatch):
    """TIES over an unchanged expert: its cut is known without looking (the first k of
    all-zero magnitudes), so the radix select runs for the changed experts only."""
    calls = []
    real = exact.top_k_cuts
    monkeypatch.setattr(exact, "top_k_cuts", lambda pieces, ks: calls.append(ks) or real(pieces, ks))
    base, models = grid_inputs(0)
    job = TensorJob("w", base, models, [{"weight": 1.0, "density": 0.3}] * 3, {"normalize": True, "lambda": 1.0},
                    torch.float32, torch.bfloat16, model_ids=[0, 1, 2], seed=5)
    got = METHODS["ties"].merge(job)
    assert len(calls) == 2  # the ties expert and the ternary-like one; not the unchanged one
    assert torch.equal(got.view(torch.int16), reference_merge("ties", job).view(torch.int16))


def test_the_selection_keeps_nothing_of_the_tensors_size():
    """Peak RSS (the process's own VmHWM, reset after a warm-up on a small tensor) of a
    fresh process selecting the top 3/4 of 2**25 zeros (128 MiB): the old select built an
    index array of 8 bytes per tied element (it grew by 1.1 GiB here); this one holds a
    piece and two histograms."""
    script = PEAK_RSS + (
        "import torch\n"
        "from hivemerge.merge.numerics import exact\n"
        "exact.top_k_cuts(exact._pieces(torch.zeros(1 << 21)), [1 << 20])  # warm: kernels and threads\n"
        "values = torch.zeros(1 << 25)\n"
        "reset_peak()\n"
        "before = status_kib('VmRSS')\n"
        "cut = exact.top_k_cuts(exact._pieces(values), [3 << 23])[0]\n"
        "assert cut.threshold == 0 and cut.tie_end == 3 << 23\n"
        "print(status_kib('VmHWM') - before)\n"
    )
    grown_kib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert grown_kib < 24 * 1024, f"the selection grew the process by {grown_kib / 1024:.0f} MiB"


def test_an_unchanged_tensor_that_overflows_in_the_merge_dtype_is_selected_as_before():
    """The unchanged-tensor shortcut holds only where the task vector is +0 in the merge's
    dtype: 1e5 in a bf16 base is inf in fp16, inf - inf is NaN, and the selection must
    then be the radix select's, not "the first k"."""
    from hivemerge.merge.methods.sparsify import keep_by_rank

    base = torch.zeros(16, dtype=torch.bfloat16)
    base[0] = base[5] = 1e5
    delta = (base.to(torch.float16) - base.to(torch.float16)).abs()
    got = keep_by_rank(base, base.clone(), torch.float16, 0, 3).keep_bits(delta, 0).bool()
    assert torch.equal(got, exact.top_k_mask(delta, 3)) and got.tolist()[:4] == [False, True, True, True]


# -- writing behind the merge ------------------------------------------------------------

def test_the_writer_thread_writes_in_order_and_a_failed_write_leaves_nothing(tiny_family, tmp_path, monkeypatch):
    """The output is written from a thread while the next tensor merges: the bytes are
    those of writing in line, and a write that fails fails the merge, with no output."""
    from conftest import merge_doc

    from hivemerge.merge.engine import WriteBehind
    from hivemerge.merge.io.writer import ShardedWriter

    doc = {"merge_method": "ties", "base_model": str(tiny_family["base"]), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": str(tiny_family[e])} for e in ("math", "code")]}
    behind = merge_doc(doc, tmp_path / "behind")
    monkeypatch.setattr(WriteBehind, "write", lambda self, name, tensor: self._writer.write(name, tensor))
    in_line = merge_doc(doc, tmp_path / "in-line")
    assert list(behind) == list(in_line) and all(torch.equal(behind[n], in_line[n]) for n in behind)

    monkeypatch.undo()
    written = []

    def failing(self, name, tensor):
        if len(written) == 3:
            raise OSError("No space left on device")
        written.append(name)
        return real(self, name, tensor)

    real = ShardedWriter.write
    monkeypatch.setattr(ShardedWriter, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        merge_doc(doc, tmp_path / "failed")
    assert not (tmp_path / "failed").exists() and len(written) == 3


def test_read_buffers_know_the_tensors_that_lie_in_them():
    """What the engine copies before the next read overwrites it (a method may return an input as is)."""
    from types import SimpleNamespace

    from hivemerge.merge.engine import ReadBuffers
    from hivemerge.merge.io.sources import TensorInfo

    buffers = ReadBuffers()
    model = SimpleNamespace(recipe_index=0, source=SimpleNamespace(tensors={"w": TensorInfo(torch.float32, (4,))}))
    buffer = buffers.take(model, "w")
    assert buffers.holds(buffer[4:8].view(torch.float32)) and not buffers.holds(buffer.clone())


# -- DELLA's rank-dependent drop ------------------------------------------------------------

def test_della_masks_do_not_depend_on_the_block_or_chunk_size(monkeypatch):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(37, 29, generator=g).bfloat16()
    models = [(base.float() + torch.round(torch.randn(37, 29, generator=g) * 3) / 64).bfloat16() for _ in range(2)]
    params = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 0.5, "density": 0.3, "epsilon": 0.1}]

    def merged():
        job = TensorJob("m", base, models, params, {"normalize": True, "lambda": 1.0, "rescale": True}, torch.float32,
                        torch.bfloat16, model_ids=[0, 1], seed=2)
        return METHODS["della"].merge(job).view(torch.int16)

    want = merged()
    for block, chunk in ((8, 1 << 12), (64, 40), (1 << 20, 1 << 18)):
        monkeypatch.setattr(sparsify, "_BLOCK", block)
        monkeypatch.setattr(sparsify, "_CPU_CHUNK", chunk)
        assert torch.equal(merged(), want), (block, chunk)


def test_della_keeps_each_rank_with_its_probability():
    """400 rows of 50: the entry of ascending magnitude rank r is kept with probability
    0.5 - 0.3 + 0.6 r / 49 (0.2 for the smallest, 0.8 for the largest); the kept fraction
    of each fifth of the ranks is within 4 standard errors of its mean probability."""
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(400, 50, generator=g)
    rule = sparsify.KeepDella(torch.zeros(20000), delta.reshape(-1), torch.float32, (400, 50), 0.5, 0.3, (123, 456))
    keep = rule.keep_bits(delta.reshape(-1), 0).bool().view(400, 50)
    rank = torch.argsort(torch.argsort(delta.abs(), dim=1, stable=True), dim=1)
    for fifth in range(5):
        ranks = range(10 * fifth, 10 * fifth + 10)
        p = sum(0.2 + 0.6 * r / 49 for r in ranks) / 10
        kept = sum(int(keep[rank == r].sum()) for r in ranks) / 4000
        assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / 4000), (fifth, kept, p)


# -- passes split among the merge's workers (numerics/threads.py) ---------------------------

@pytest.fixture
def workers(monkeypatch):
    """Sets how many workers split the spans (restored after the test)."""
    from hivemerge.merge.numerics import threads

    monkeypatch.setattr(threads, "_width", threads._width)
    return lambda n: monkeypatch.setattr(threads, "_width", n)


def test_in_parallel_keeps_order_runs_nested_work_in_place_and_raises_once_all_are_done(workers):
    import threading
    import time

    from hivemerge.merge.numerics import threads

    workers(3)
    seen = []

    def nested(i: int) -> list:
        names = threads.in_parallel(lambda j: threading.current_thread().name, [0, 1, 2])
        return [i, len(set(names))]  # inside a worker: the worker itself runs the nested items

    assert threads.in_parallel(nested, [0, 1, 2, 3]) == [[0, 1], [1, 1], [2, 1], [3, 1]]
    assert threads.each(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert threads.split(10, 3) == [range(0, 3), range(3, 6), range(6, 10)] and threads.split(2, 5) == [range(0, 1), range(1, 2)]

    def slow_or_failing(i: int) -> int:
        if i == 0:
            raise ValueError("span 0")
        time.sleep(0.2)
        seen.append(i)
        return i

    with pytest.raises(ValueError, match="span 0"):
        threads.in_parallel(slow_or_failing, [0, 1, 2])
    assert sorted(seen) == [1, 2]  # the others had finished when the error came out


def test_workers_run_torch_at_one_thread_and_the_caller_keeps_its_count(workers):
    from hivemerge.merge.numerics import threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers(3)
        assert threads.in_parallel(lambda _: torch.get_num_threads(), [0, 1, 2, 3]) == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2  # the caller's own count (a per-thread setting)
        workers(1)
        assert threads.in_parallel(lambda _: torch.get_num_threads(), [0, 1]) == [2, 2]  # one worker: the caller runs them
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_a_merge_split_among_1_2_or_3_workers_gives_the_same_bytes(monkeypatch, workers, method):
    """Small chunks (many spans per tensor) so that each pass is really split; the
    reference is the whole-tensor formulation, and 1, 2 and 3 workers agree with it."""
    monkeypatch.setattr(sparsify, "_CPU_CHUNK", 1 << 9)  # 10 chunks
    monkeypatch.setattr(sparsify, "_RESCALE_SPAN", 1 << 9)  # 10 spans of L1 sums
    monkeypatch.setattr(sparsify, "_BLOCK", 1 << 9)  # DELLA: blocks of 8 rows, 6 of them
    base, models = grid_inputs(3)
    base, models = base[:5002].view(41, 122), [m[:5002].view(41, 122) for m in models]
    params = {"normalize": True, "lambda": 1.0, "rescale": True, "epsilon": 0.1}
    model_params = [{"weight": w, "density": 0.35, "gamma": 0.05, "epsilon": 0.1} for w in (0.6, 1.0, -0.4)]
    job = TensorJob("w", base, models, model_params, params, torch.float32, torch.bfloat16, model_ids=[0, 1, 2], seed=5)
    results = []
    for n in (1, 2, 3):
        workers(n)
        results.append(METHODS[method].merge(job).view(torch.int16))
    if method != "della":  # della's draw has no whole-tensor reference here; its masks are tested below
        assert torch.equal(results[0], reference_merge(method, job).view(torch.int16))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_the_radix_select_split_among_workers_equals_the_sort(workers):
    g = torch.Generator().manual_seed(8)
    values = torch.randint(0, 9, (20_011,), generator=g).float() / 8
    values[::97] = float("nan")
    for n in (1, 3):
        workers(n)
        for k in (1, 777, 10_000, 19_000):
            cut = exact.top_k_cuts(exact.Spans(lambda a, b: values[a:b], values.numel(), 301), [k])[0]
            assert torch.equal(cut.keep_bits(values).bool(), reference_top_k_mask(values, k)), (n, k)


@pytest.mark.parametrize("spec", ["ternary", "sparse:density=0.3", "int8:block=50"])
def test_a_decode_split_among_workers_gives_the_bytes_of_one(monkeypatch, workers, spec):
    from hivemerge.merge.deltas import codecs

    g = torch.Generator().manual_seed(2)
    base = (torch.randn(10_007, generator=g) * 0.05).bfloat16()
    expert = (base.float() + 0.01 * torch.randn(10_007, generator=g)).bfloat16()
    codec, opts = codecs.parse_codec(spec)
    parts = codec.encode("w", base, expert, opts)
    workers(1)
    whole = codec.decode(base, parts, torch.bfloat16, tuple(base.shape), opts)
    monkeypatch.setattr(codecs, "_DECODE_SPAN", 64)  # 157 spans, each decoded on its own
    for n in (2, 3):
        workers(n)
        got = codec.decode(base.clone(), parts, torch.bfloat16, tuple(base.shape), opts)
        assert torch.equal(got.view(torch.int16), whole.view(torch.int16)), (spec, n)
        scratch = base.clone()  # over the base's own copy, as a delta source decodes
        assert codec.decode(scratch, parts, torch.bfloat16, tuple(base.shape), opts, out=scratch).data_ptr() == scratch.data_ptr()
        assert torch.equal(scratch.view(torch.int16), whole.view(torch.int16)), (spec, n)
        into = torch.full((base.numel(),), -1.0, dtype=torch.bfloat16)  # into a buffer of its own, the base left alone
        kept = base.clone()
        codec.decode(kept, parts, torch.bfloat16, tuple(base.shape), opts, out=into)
        assert torch.equal(into.view(torch.int16), whole.view(torch.int16)) and torch.equal(kept.view(torch.int16), base.view(torch.int16))


def test_a_cut_among_the_zeros_of_half_precision_deltas_needs_no_low_bits_pass():
    """|a - b| of bf16 numbers is 0 or at least 2**-133 (float32 bits 0x10000): a cut
    that falls among the zeros (a ternary delta under TIES at density 0.5) is found from
    the high-bits counts, then the ties: the spans are computed fewer than twice each,
    and the selection is the sort's."""
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(40_000, generator=g) * 0.05).bfloat16()
    model = (base.float() + torch.sign(torch.randn(40_000, generator=g)) * 0.01 * (torch.rand(40_000, generator=g) > 0.58)).bfloat16()
    magnitudes = (model.float() - base.float()).abs()
    calls = []

    def at(start: int, stop: int) -> torch.Tensor:
        calls.append(start)
        return magnitudes[start:stop]

    k = 20_000  # about 42% are nonzero: the cut is at zero
    cut = exact.top_k_cuts(exact.Spans(at, magnitudes.numel(), 1000, zeros_alone=True), [k])[0]
    assert cut.threshold == 0
    assert torch.equal(cut.keep_bits(magnitudes).bool(), reference_top_k_mask(magnitudes, k))
    assert 40 <= len(calls) < 80  # the first pass (40 spans) and the ties' few; no second pass
    full = exact.top_k_cuts(exact.Spans(lambda a, b: magnitudes[a:b], magnitudes.numel(), 1000), [k])[0]
    assert full == cut


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("lam, normalize", [(1.0, True), (-0.5, False)])
def test_a_tensor_no_expert_changed_merges_as_the_whole_formulation_without_selecting(monkeypatch, method, lam, normalize):
    """Every expert left the tensor as it was: the merged task vector of +0 entries is
    computed once and added to each base entry, signed zeros included (-0.0 + +0.0 is
    +0.0, so the output is not simply the base), and nothing is selected or drawn."""
    monkeypatch.setattr(exact, "top_k_cuts", lambda *a: pytest.fail("selected"))
    monkeypatch.setattr(sparsify, "KeepDella", lambda *a, **k: pytest.fail("drew"))
    base = torch.tensor([0.0, -0.0, 1.5, -2.25, 1e-3, -0.0, 3.0, 0.0] * 100, dtype=torch.bfloat16)
    models = [base.clone() for _ in range(3)]
    params = {"normalize": normalize, "lambda": lam, "rescale": True, "epsilon": 0.1}
    model_params = [{"weight": w, "density": 0.4, "gamma": 0.05, "epsilon": 0.1} for w in (0.6, 1.0, -0.4)]
    job = TensorJob("w", base, models, model_params, params, torch.float32, torch.bfloat16, model_ids=[0, 1, 2], seed=5)
    got = METHODS[method].merge(job)
    if method != "della":
        assert torch.equal(got.view(torch.int16), reference_merge(method, job).view(torch.int16))
    zero = 0.0 * lam  # the merged task vector: +0.0 times lambda (-0.0 for a negative lambda)
    assert torch.equal(got.view(torch.int16), (base.float() + zero).bfloat16().view(torch.int16))
    if lam > 0:  # -0.0 + +0.0 is +0.0: the base's -0.0 entries come out +0.0
        assert torch.equal(got.view(torch.int16)[base.view(torch.int16) == -32768], torch.zeros(200, dtype=torch.int16))


def test_a_tensor_no_expert_changed_leaves_the_callers_base_as_it_was():
    base = torch.tensor([0.0, -0.0, 1.5, -0.0] * 10)  # float32 base and math: .to() would be the base itself
    job = TensorJob("w", base, [base.clone(), base.clone()], [{"weight": 1.0, "density": 0.5}] * 2,
                    {"normalize": True, "lambda": 1.0}, torch.float32, torch.float32, model_ids=[0, 1], seed=5)
    before = base.clone()
    got = METHODS["ties"].merge(job)
    assert torch.equal(base.view(torch.int32), before.view(torch.int32))  # its -0.0 entries are still -0.0
    assert torch.equal(got.view(torch.int32), (before + 0.0).view(torch.int32))


def test_della_bounds_are_checked_even_where_no_expert_changed_the_tensor():
    base = torch.zeros(64, dtype=torch.bfloat16)
    job = TensorJob("w", base, [base.clone()], [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}],
                    {"normalize": True, "lambda": 1.0, "rescale": True}, torch.float32, torch.bfloat16, model_ids=[0], seed=5)
    with pytest.raises(UserInputError, match="density \\+- epsilon"):
        METHODS["della"].merge(job)


def test_workers_that_cannot_start_leave_the_work_to_the_caller(workers, monkeypatch):
    from hivemerge.merge.numerics import threads

    class NoThreads:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, *args):
            raise RuntimeError("can't start new thread")

        def shutdown(self, wait=True):
            pass

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "ThreadPoolExecutor", NoThreads)
    monkeypatch.setattr(threads, "_pools", {})
    workers(5)
    assert threads.in_parallel(lambda x: x + 1, [1, 2, 3]) == [2, 3, 4]  # in the caller, not an error
    assert torch.get_num_threads() == before


def test_single_thread_keeps_the_spans_in_the_caller(workers):
    import threading

    from hivemerge.merge.numerics import threads

    workers(3)
    with threads.single_thread():
        assert threads.workers() == 1
        assert set(threads.in_parallel(lambda _: threading.current_thread().name, [0, 1, 2])) == {threading.current_thread().name}
    assert threads.workers() == 3


def test_bit_counts_read_a_mask_of_any_shape_flat():
    from hivemerge.merge.numerics.bits import count_bits, count_bits_per_group, pack_bits

    keep = torch.rand(1003, generator=torch.Generator().manual_seed(1)) > 0.5
    flat = pack_bits(keep)
    shaped = flat.view(2, -1)  # 126 bytes as 2 x 63
    assert count_bits(shaped, 1003) == count_bits(flat, 1003) == int(keep.sum())
    assert torch.equal(count_bits_per_group(shaped, 1003, 256), count_bits_per_group(flat, 1003, 256))


def test_merged_tensors_take_turns_in_two_reused_buffers():
    """One buffer is being written while the next tensor is merged into the other; each
    grows only when a larger tensor comes."""
    from hivemerge.merge.engine import OutputBuffers

    outputs = OutputBuffers()
    a, b = outputs.next(100), outputs.next(50)
    assert a.data_ptr() != b.data_ptr() and a.numel() >= 100 and b.numel() >= 50
    assert outputs.next(80).data_ptr() == a.data_ptr()
    assert outputs.next(60).data_ptr() != b.data_ptr()  # 50 bytes were too few: a larger one
    assert outputs.next(10).data_ptr() == a.data_ptr()
