"""``run_demo`` end to end on a tiny spec: real nodes on 127.0.0.1, a merge round, the
consensus model, the table and the plot; a second run reuses the cached models; the
model cache is keyed by the spec. No p2pd may outlive the demo."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from network_fixtures import no_leftover_daemons, p2pd_pids, wait_p2pd_gone  # noqa: F401 (autouse)

from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.toy import tasks
from hivemerge.merge.toy.experts import SPEC, build_experts
from hivemerge.node import demo as demo_module
from hivemerge.node.demo import FUSION, ROUND_RECIPE

TINY = {**SPEC, "hidden": 32, "layers": 2, "base_steps": 20, "expert_steps": 10}
COUNT = 20
# seconds until a round's commitments close (the demo's own is 75): time for the fuser to
# merge and distil the tiny models' packs (TINY_FUSION) on a busy machine
DEADLINE = 12
TINY_FUSION = {"steps": 5, "batch": 8}
TINY_PROBE = 20  # probe examples per domain, and replay prompts
STAGES = ["base", *tasks.DOMAINS]
ROWS = ["base", *tasks.DOMAINS, "consensus"]


def file_times(models: Path) -> dict[str, int]:
    return {str(p.relative_to(models)): p.stat().st_mtime_ns
            for stage in STAGES for p in sorted((models / stage).rglob("*")) if p.is_file()}


@contextmanager
def tiny_round():
    """The demo's round scaled to a test: one thread, a short commitment window, a tiny fusion step."""
    # Tiny models on a busy 2-core machine: with torch's default 2 threads, evaluating them
    # oversubscribes the cores and takes anywhere from 1 to 8 s (train() uses 1 thread itself).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # Commitments close 12 s after the proposal instead of 15 (on loopback every node
            # commits within about a second: the nodes poll every 0.5 s), and the fusion step,
            # done by the fuser before it proposes, is scaled to the tiny models.
            # test_consensus_model_is_the_rounds_result checks that all four committed.
            patch.setitem(ROUND_RECIPE, "deadline", DEADLINE)
            for key, value in TINY_FUSION.items():
                patch.setitem(FUSION, key, value)
            patch.setattr(demo_module, "PROBE_PER_DOMAIN", TINY_PROBE)
            patch.setattr(demo_module, "REPLAY_PROMPTS", TINY_PROBE)
            yield patch
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two runs of the demo on one workdir; what each said, trained, took and returned."""
    from hivemerge.node.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    workdir, out = root / "work", root / "out"
    runs = []
    with tiny_round():
        _run_twice(run_demo, workdir, out, root, runs)
    return {"root": root, "workdir": workdir, "out": out, "runs": runs}


def _run_twice(run_demo, workdir: Path, out: Path, root: Path, runs: list) -> None:
    for _ in range(2):
        said, trained = [], []
        started = time.perf_counter()
        result = run_demo(workdir, out, say=said.append, count=COUNT, spec=TINY,
                          train_progress=lambda stage, done, total: trained.append((stage, done, total)))
        seconds = time.perf_counter() - started
        left = wait_p2pd_gone(root, timeout=10)  # every node it started is stopped on the way out
        runs.append({"result": json.loads(json.dumps(result)),  # as it was (its recipe is ROUND_RECIPE itself)
                     "said": said, "trained": trained, "seconds": seconds, "p2pd_left": left,
                     "times": file_times(workdir / "models"),
                     "json": json.loads((out / "results.json").read_text()),
                     "consensus_id": model_id(SafetensorsModel(out / "consensus")),
                     "card": (out / "consensus" / "README.md").read_text()})


def test_results_table_has_every_model_and_suite(demo):
    for run in demo["runs"]:
        result = run["json"]
        assert result == run["result"]  # results.json is what run_demo returned
        assert set(result) == {"charter_id", "round_id", "weight_merge_id", "consensus_id", "recipe", "fusion", "fusion_verdict", "results",
                           "seconds"}
        assert result["fusion"] == json.loads(json.dumps({**FUSION, **TINY_FUSION}))
        assert result["fusion_verdict"] == "kept"  # every participant kept the healed merge
        assert list(result["results"]) == ROWS
        for name, row in result["results"].items():
            assert list(row) == list(tasks.SUITES), name
            for suite, cell in row.items():
                assert cell["suite"] == suite and cell["examples"] == COUNT
                assert 0.0 <= cell["accuracy"] <= 1.0
                assert math.isclose(cell["accuracy"] * COUNT, round(cell["accuracy"] * COUNT))  # k of 20 exact matches
                assert math.isfinite(cell["loss"]) and cell["loss"] > 0
        assert result["recipe"] == json.loads(json.dumps({**ROUND_RECIPE, "deadline": DEADLINE}))
        assert 0 < result["seconds"] <= run["seconds"] + 1


def test_plot_is_a_png(demo):
    data = (demo["out"] / "results.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (990, 495)  # 9 x 4.5 inches at 110 dpi
    assert len(data) > 10_000


def test_consensus_model_is_the_rounds_result(demo):
    models = demo["workdir"] / "models"
    inputs = {model_id(SafetensorsModel(models / stage)) for stage in STAGES}
    assert len(inputs) == 4
    for run in demo["runs"]:
        assert run["consensus_id"] == run["result"]["consensus_id"]
        assert run["consensus_id"] not in inputs  # a merge, not the base or an expert
    # a second round on the same experts merges the same deltas into the same bytes
    first, second = demo["runs"]
    assert first["result"]["round_id"] != second["result"]["round_id"]
    assert first["consensus_id"] == second["consensus_id"]
    # the plain weight merge the fusion step healed: the same bytes in both rounds, not the consensus
    merged = model_id(SafetensorsModel(demo["workdir"] / "weight-merge"))
    assert first["result"]["weight_merge_id"] == second["result"]["weight_merge_id"] == merged
    assert merged not in inputs | {first["consensus_id"]}
    for run in demo["runs"]:
        card = run["card"]
        assert f"round {run['result']['round_id'][:12]}" in card and f"Content id `{run['consensus_id']}`" in card
        # every expert's node committed its delta, and the fetch-only node (the fuser) the fused one
        assert re.search(r"attested by [34] of 4 participants", card), card
        assert card.count("\n| ") == 2 + 4  # the participants table: header, rule, four rows


def test_second_run_reuses_the_cached_models(demo):
    first, second = demo["runs"]
    assert {stage for stage, _, _ in first["trained"]} == set(STAGES)
    assert (("base", TINY["base_steps"], TINY["base_steps"]) in first["trained"]
            and ("logic", TINY["expert_steps"], TINY["expert_steps"]) in first["trained"])
    assert second["trained"] == []  # nothing trained again
    assert first["times"] and second["times"] == first["times"]  # not one model file rewritten
    assert any(name.endswith("model.safetensors") for name in first["times"])
    assert second["seconds"] < first["seconds"], (first["seconds"], second["seconds"])


def test_no_p2pd_left_behind(demo):
    for run in demo["runs"]:
        assert run["p2pd_left"] == []
        assert run["said"][-1] == "evaluating base, experts and consensus on every suite"
        assert "all nodes stopped" in run["said"]
    assert p2pd_pids(demo["root"]) == []


def test_a_missing_expert_is_rebuilt_bit_for_bit(demo, tmp_path):
    models = shutil.copytree(demo["workdir"] / "models", tmp_path / "models")
    original = (models / "strings" / "model.safetensors").read_bytes()
    shutil.rmtree(models / "strings")
    trained = []
    paths = build_experts(models, progress=lambda stage, done, total: trained.append(stage), spec=TINY)
    assert set(trained) == {"strings"}
    assert paths == {stage: models / stage for stage in STAGES}
    assert (models / "strings" / "model.safetensors").read_bytes() == original  # training is deterministic


def test_experts_trained_in_parallel_are_those_trained_one_by_one(demo, tmp_path):
    """From the demo's base, the experts trained in two worker processes and trained here,
    one after another, are the same bytes (and the demo's own, whatever its core count)."""
    built = {}
    for workers in (2, 1):
        models = shutil.copytree(demo["workdir"] / "models", tmp_path / f"models-{workers}")
        for domain in tasks.DOMAINS:
            shutil.rmtree(models / domain)
        trained = []
        build_experts(models, progress=lambda stage, done, total: trained.append((stage, done)), spec=TINY, workers=workers)
        assert sorted(trained) == sorted((d, n) for d in tasks.DOMAINS for n in range(1, TINY["expert_steps"] + 1))
        built[workers] = {d: (models / d / "model.safetensors").read_bytes() for d in tasks.DOMAINS}
    demo_own = {d: (demo["workdir"] / "models" / d / "model.safetensors").read_bytes() for d in tasks.DOMAINS}
    assert built[2] == built[1] == demo_own


def test_a_failing_expert_raises_what_failed_and_leaves_no_model(demo, tmp_path):
    models = shutil.copytree(demo["workdir"] / "models", tmp_path / "models")
    bad = {**TINY, "expert_lr": -1.0}  # AdamW refuses a negative learning rate, in the worker
    (models / "spec.json").write_text(json.dumps(bad, indent=2))  # the same base: only the experts are trained
    for domain in tasks.DOMAINS:
        shutil.rmtree(models / domain)
    with pytest.raises(RuntimeError, match=r"^training the (math|strings|logic) expert: ValueError: Invalid learning rate: -1.0$"):
        build_experts(models, spec=bad, workers=2)
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == ["base"]  # no expert, no partial one


def running_in_group(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # state, ppid, pgrp
            found.append(int(entry))
    return found


CTRL_C_SCRIPT = """
import sys
from pathlib import Path
from hivemerge.merge.toy.experts import SPEC, build_experts
if __name__ == "__main__":
    spec = {**SPEC, "hidden": 32, "layers": 2, "base_steps": 20, "expert_steps": 100_000}
    build_experts(Path(sys.argv[1]), spec=spec, workers=2,
                  progress=lambda stage, done, total: print(stage, done, flush=True))
"""


def test_ctrl_c_while_experts_train_in_parallel_stops_every_worker_cleanly(tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(CTRL_C_SCRIPT)
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "models")], stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not re.search(r"^(math|strings|logic) \d+$", log.read_text(), re.M):  # an expert is training
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        workers = running_in_group(proc.pid)
        assert len(workers) >= 3  # the script and its two workers (and multiprocessing's tracker)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        started = time.time()
        assert proc.wait(timeout=30) != 0
        assert time.time() - started < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert "KeyboardInterrupt" in output and "leaked" not in output, output[-2000:]
    deadline = time.time() + 10  # multiprocessing's resource tracker ends just after the script
    while running_in_group(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert running_in_group(proc.pid) == []  # no worker left running
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["base", "spec.json"]  # no expert, no partial one


def test_another_spec_rebuilds_everything(demo, tmp_path):
    models = shutil.copytree(demo["workdir"] / "models", tmp_path / "models")
    before = {stage: model_id(SafetensorsModel(models / stage)) for stage in STAGES}
    other = {**TINY, "seed": 1}
    trained = []
    build_experts(models, progress=lambda stage, done, total: trained.append(stage), spec=other)
    assert set(trained) == set(STAGES)
    assert json.loads((models / "spec.json").read_text()) == other
    after = {stage: model_id(SafetensorsModel(models / stage)) for stage in STAGES}
    assert all(after[s] != before[s] for s in STAGES)
    # and the same spec again trains nothing
    trained.clear()
    build_experts(models, progress=lambda stage, done, total: trained.append(stage), spec=other)
    assert trained == []


@pytest.mark.parametrize("ending", ["done", "interrupted", "error"])
def test_a_worker_whose_work_is_over_ignores_a_second_ctrl_c(monkeypatch, ending):
    """The parent forwards Ctrl-C to the workers still alive; one already exiting (after its
    own KeyboardInterrupt, an error or its last step) must not be interrupted again while
    multiprocessing releases its semaphores (the cause of a "leaked semaphore" warning)."""
    import queue
    import signal

    from hivemerge.merge.toy import experts

    def train(*args):
        if ending == "interrupted":
            raise KeyboardInterrupt
        if ending == "error":
            raise ValueError("lr must be positive")

    monkeypatch.setattr(experts, "_train_expert", train)
    previous = signal.getsignal(signal.SIGINT)
    updates = queue.Queue()
    try:
        # Python's own handler, however pytest was started (a background job starts with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if ending == "done":
            experts._worker("math", "base", "target", experts.SPEC, updates)
        else:
            with pytest.raises(SystemExit):
                experts._worker("math", "base", "target", experts.SPEC, updates)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert updates.get_nowait()[0] == ending
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the shipped models: what a fresh clone's demo uses, with nothing trained -------------

# Content ids of node/demo_models (trained from SPEC with build_experts): fixed, so the
# base and expert rows are the same on every machine. Retraining and reshipping them
# (a change of SPEC) changes these.
SHIPPED_IDS = {
    "base": "67b882bcc03dc2535a7c3b1ab5a6a96ff1da96debb1dc7710cc4754ae4dcfe60",
    "math": "48136fc29139a1b3af08716badc718970ecb020393b098853938c15db6da9098",
    "strings": "ae52bf4a7fe04e3cec6de813e587a812c54b67a9f3ed3546d6395bdc67aa6a42",
    "logic": "c04d08b8c581cd7e52c912d2c752f2b6379cffcf11528baf0b3c183f41b3b82c",
}
# The round's plain weight merge of the shipped experts' int8 deltas (ROUND_RECIPE, before
# the fusion step heals it): the engine is bitwise deterministic, so this id is the same on
# every machine and thread count (the fusion settings of TINY_FUSION do not enter it).
SHIPPED_WEIGHT_MERGE_ID = "cea3e400df9849e5edf58b286e623618f6d9cc84178bc8f108854c36c50a56ba"
# The shipped models' cells as `hivemerge demo` prints them (200 examples per suite, its default)
SHIPPED_ROWS = {
    "base": {"math": "9.5 (1.02)", "strings": "100.0 (0.00)", "logic": "90.5 (0.10)", "compose": "26.0 (0.97)"},
    "math": {"math": "86.0 (0.14)", "strings": "97.5 (0.02)", "logic": "81.0 (0.19)", "compose": "18.0 (1.13)"},
    "strings": {"math": "8.5 (1.04)", "strings": "100.0 (0.00)", "logic": "88.5 (0.11)", "compose": "25.5 (0.98)"},
    "logic": {"math": "10.0 (1.04)", "strings": "100.0 (0.00)", "logic": "97.5 (0.01)", "compose": "25.0 (0.99)"},
}
SHIPPED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
SHIPPED_MAX_BYTES = 16 << 20  # the wheel carries them: four fp32 models of about 2.8 MB


def cell(result: dict) -> str:
    return f"{100 * result['accuracy']:.1f} ({result['loss']:.2f})"  # as `hivemerge demo` prints it


def shipped_files() -> dict[str, tuple[int, int, str]]:
    import hashlib

    return {str(p.relative_to(demo_module.SHIPPED_MODELS)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(demo_module.SHIPPED_MODELS.rglob("*")) if p.is_file()}


def no_training(*args, **kwargs):
    raise AssertionError("the demo trained a model")


def forbid_training(patch: pytest.MonkeyPatch) -> None:
    from hivemerge.merge.toy import experts, training

    for module, name in ((demo_module, "build_experts"), (experts, "build_experts"), (experts, "_train_base"),
                         (experts, "_train_expert"), (experts, "train"), (training, "train")):
        patch.setattr(module, name, no_training)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """One run of the demo as on a fresh clone (an empty workdir, the default spec and
    count), with every training function raising."""
    root = tmp_path_factory.mktemp("shipped")
    before = shipped_files()
    said = []
    with tiny_round() as patch:
        forbid_training(patch)
        result = demo_module.run_demo(root / "work", root / "out", say=said.append)
    return {"result": result, "said": said, "before": before, "after": shipped_files(), "root": root,
            "p2pd_left": wait_p2pd_gone(root, timeout=10)}


def test_the_shipped_models_are_those_of_the_spec_with_fixed_ids():
    shipped_dir = demo_module.SHIPPED_MODELS
    assert json.loads((shipped_dir / "spec.json").read_text()) == SPEC  # a new SPEC must be trained and shipped
    assert sorted(p.name for p in shipped_dir.iterdir()) == sorted([*STAGES, "spec.json"])
    for stage in STAGES:
        assert {p.name for p in (shipped_dir / stage).iterdir()} == SHIPPED_FILES, stage
    assert {stage: model_id(SafetensorsModel(shipped_dir / stage)) for stage in STAGES} == SHIPPED_IDS
    assert sum(p.stat().st_size for p in shipped_dir.rglob("*") if p.is_file()) < SHIPPED_MAX_BYTES


def test_without_retrain_the_demo_uses_the_shipped_models_and_trains_nothing(tmp_path, monkeypatch):
    forbid_training(monkeypatch)
    said = []
    paths = demo_module.demo_models(tmp_path, said.append)
    assert paths == {stage: demo_module.SHIPPED_MODELS / stage for stage in STAGES}
    assert {stage: model_id(SafetensorsModel(path)) for stage, path in paths.items()} == SHIPPED_IDS
    assert not (tmp_path / "models").exists()
    assert said == [f"using the base and the domain experts shipped in {demo_module.SHIPPED_MODELS}"]


def test_retrain_trains_in_the_workdir(tmp_path, monkeypatch):
    """--retrain (or another spec) builds the models in the workdir's cache, as before models shipped."""
    calls = []

    def build(workdir, progress=None, spec=SPEC, workers=1):
        calls.append((workdir, spec, workers))
        return {stage: workdir / stage for stage in STAGES}

    monkeypatch.setattr(demo_module, "build_experts", build)
    assert demo_module.demo_models(tmp_path, print, retrain=True) == {stage: tmp_path / "models" / stage for stage in STAGES}
    assert demo_module.demo_models(tmp_path, print, spec=TINY) == {stage: tmp_path / "models" / stage for stage in STAGES}
    assert calls == [(tmp_path / "models", SPEC, None), (tmp_path / "models", TINY, None)]  # workers: one per core


def test_a_fresh_demo_prints_the_shipped_rows_and_weight_merge_id(shipped):
    result = shipped["result"]
    assert shipped["said"][0] == f"using the base and the domain experts shipped in {demo_module.SHIPPED_MODELS}"
    # the round runs under the demo's network charter, and the fetched consensus names it
    assert shipped["said"][1].startswith(f"network charter {result['charter_id'][:12]}: ")
    assert result["charter_id"] in (shipped["root"] / "out" / "consensus" / "README.md").read_text()
    assert {name: {s: cell(row[s]) for s in tasks.SUITES} for name, row in result["results"].items() if name != "consensus"} == SHIPPED_ROWS
    assert result["weight_merge_id"] == SHIPPED_WEIGHT_MERGE_ID
    assert f"the round's weight merge, before healing (the same bytes on every machine): {SHIPPED_WEIGHT_MERGE_ID}" in shipped["said"]
    # TINY_FUSION's 5 steps make the probe loss worse (0.23 -> 0.28 here): the participants
    # exclude the fused delta and the round's result is its plain weight merge, built by
    # four nodes: the very bytes of SHIPPED_WEIGHT_MERGE_ID
    assert result["fusion_verdict"].startswith("excluded: fusion: no improvement on the probe"), result["fusion_verdict"]
    assert result["consensus_id"] == model_id(SafetensorsModel(shipped["root"] / "out" / "consensus")) == SHIPPED_WEIGHT_MERGE_ID
    assert SHIPPED_WEIGHT_MERGE_ID not in SHIPPED_IDS.values()
    assert shipped["after"] == shipped["before"]  # read in place, not one byte or time changed
    assert not (shipped["root"] / "work" / "models").exists()
    assert shipped["p2pd_left"] == []


def test_demo_command_passes_retrain_and_prints_both_ids(tmp_path, monkeypatch):
    from typer.testing import CliRunner as TyperRunner

    from hivemerge.node.cli.app import app

    calls = []
    rows = {name: {s: {"suite": s, "accuracy": 0.5, "loss": 1.0, "examples": 10} for s in tasks.SUITES} for name in ROWS}

    def run(workdir, out, say, train_progress=None, count=200, spec=SPEC, retrain=False):
        calls.append((workdir, retrain))
        verdict = "kept" if retrain else "excluded: fusion: no improvement on the probe"
        return {"results": rows, "weight_merge_id": "a" * 64, "consensus_id": "b" * 64, "fusion_verdict": verdict, "seconds": 1.0}

    monkeypatch.setattr(demo_module, "run_demo", run)
    for argv, retrain, consensus in ((["demo"], False, "the weight merge"),
                                     (["demo", "--retrain"], True, "healed: healing trains, its bytes vary with the CPU")):
        done = TyperRunner().invoke(app, [*argv, "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), "--count", "10"])
        assert done.exit_code == 0, done.output
        assert calls[-1] == (tmp_path, retrain)
        assert f"\nweight merge id (before healing; the same on every machine): {'a' * 64}\n" in done.output
        assert f"\nconsensus id ({consensus}): {'b' * 64}\n" in done.output


def test_the_cli_silences_third_party_progress_bars_and_logs(monkeypatch):
    """`hivemerge` sets them before any command runs: transformers' "Loading weights" bars
    and logs, hivemind's INFO logs (transformers and hivemind are imported here already,
    as in a test's CLI driver: they are told through their APIs)."""
    import sys

    from hivemind.utils.logging import get_logger
    from transformers.utils import logging as hf_logging

    from hivemerge.node.cli import app as cli
    from hivemerge.node.ui import QUIET_ENVIRONMENT

    bars, verbosity, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), get_logger("hivemind").level
    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    get_logger("hivemind").setLevel("INFO")
    monkeypatch.setattr(sys, "argv", ["hivemerge", "methods"])
    try:
        cli.main()
        assert {name: os.environ.get(name) for name in QUIET_ENVIRONMENT} == QUIET_ENVIRONMENT  # spawned workers inherit these
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert get_logger("hivemind").level == hf_logging.ERROR
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(verbosity)
        get_logger("hivemind").setLevel(level)
