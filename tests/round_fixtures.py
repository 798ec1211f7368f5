"""Helpers for the merge-round tests: a family of tiny experts, real nodes on 127.0.0.1
with short record lives and a fast round poll, bounded waits, offline reference merges
and the ways a participant misbehaves (tampered delta, scaled delta).

Every node a test starts is closed by :meth:`RoundNet.close_all` (fixture finalizers
call it) and no p2pd daemon started under the test's folder may outlive it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from conftest import make_llama
from network_fixtures import check_no_leftover_p2pd, wait_until

from hivemerge.node.local_network import LocalNetwork
from hivemerge.protocol import rounds

RECORD_TTL = 60.0
ROUND_POLL = 0.5
DEADLINE = 4  # seconds from proposal to the close of commitments
ROUND_TIMEOUT = 90.0  # a round must reach its end (attested or failed) at every participant within this
DONE_PHASES = ("attested", "failed")


# -- models ----------------------------------------------------------------------------

def scaled_expert(base: Path, expert: Path, out: Path, factor: float) -> Path:
    """A copy of ``expert`` whose weights are base + factor * (expert - base)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(expert, out)
    b = load_file(str(base / "model.safetensors"))
    e = load_file(str(expert / "model.safetensors"))
    save_file({k: (b[k] + factor * (e[k] - b[k])).contiguous() for k in e}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def build_family(root: Path, names: list[str], base_seed: int = 0) -> dict[str, Path]:
    """A tiny Llama base and one expert per name (a perturbed copy: a stand-in for a fine-tune)."""
    family = {"base": make_llama(root / "base", seed=base_seed)}
    for i, name in enumerate(names):
        family[name] = make_llama(root / name, seed=1000 * (base_seed + 1) + i, base=family["base"])
    return family


def lora_expert(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter of ``base`` (random A and B, small), saved as safetensors: an
    expert published as its adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    with torch.no_grad():  # a fine-tune's size of change
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    model.save_pretrained(out)
    return out


def model_id_of(directory: Path) -> str:
    """The content id of a model directory (a base's id names its network's rounds)."""
    from hivemerge.merge.io.manifest import model_id
    from hivemerge.merge.io.sources import SafetensorsModel

    return model_id(SafetensorsModel(Path(directory)))


# -- nodes -----------------------------------------------------------------------------

class RoundNet(LocalNetwork):
    """The loopback network (node/local_network.py) with round settings: record TTL 60 s,
    round poll 0.5 s, CPU merges; no p2pd may outlive :meth:`close_all`."""

    def __init__(self, root: Path, **node_options):
        super().__init__(root, record_ttl=RECORD_TTL, round_poll=ROUND_POLL, device="cpu", **node_options)

    def start(self, name: str, peers=(), client_mode: bool = False):
        return super().start(name, peers=peers, client_mode=client_mode)

    def start_many(self, names: list[str]) -> list:
        """The first node, and the rest bootstrapped through it."""
        first = self.start(names[0])
        return [first] + [self.start(n, peers=first.maddrs()) for n in names[1:]]

    def close_all(self) -> None:
        try:
            super().close_all()
        finally:
            check_no_leftover_p2pd(self.root)


# -- waiting ---------------------------------------------------------------------------

def wait_round_done(nodes: list, round_id: str, timeout: float = ROUND_TIMEOUT) -> list[dict]:
    """Waits until every node's local state of the round is attested or failed; returns the states."""
    def done():
        states = [n.rounds.state(round_id) for n in nodes]
        return states if all(s and s["phase"] in DONE_PHASES for s in states) else None

    return wait_until(done, timeout, what=f"round {round_id[:12]} to end at {len(nodes)} node(s)")


def round_records(node, round_id: str) -> dict[str, dict]:
    """The round's commitments and attestations as ``node`` sees them on the DHT, by subkey."""
    return node.run(node.network.get_records(rounds.round_key(round_id)), 30)


def wait_committed(observer, round_id: str, publishers: list[str], timeout: float = 30.0) -> dict[str, dict]:
    """Waits until the commitments of ``publishers`` (public keys) are visible from ``observer``."""
    def seen():
        commits = {r["publisher"]: r for r in round_records(observer, round_id).values() if "delta_ids" in r}
        return commits if all(p in commits for p in publishers) else None

    return wait_until(seen, timeout, what=f"commitments of {len(publishers)} participant(s)")


# -- proposals -------------------------------------------------------------------------

def round_document(base: Path, domains: list[str], method: str = "ties", deadline: float = DEADLINE,
                   parameters: dict | None = None, **extra) -> dict:
    document = {
        "merge_method": method, "base_model": str(base), "select": {"domains": domains}, "deadline": deadline,
        "parameters": parameters if parameters is not None else {"weight": 1.0, "density": 0.5},
    }
    document.update(extra)
    return document


def store_proposal(node, proposal: dict) -> None:
    """Announces a ready-made proposal (as Node.propose does, with a chosen deadline)."""
    fields = {**proposal, "issued_at": time.time()}
    ttl = max(node.record_ttl, proposal["deadline"] - time.time() + 3600)
    assert node.run(node.store_record("record/proposal", rounds.rounds_key(proposal["base_id"]), fields, ttl), 30)


# -- offline reference merges ------------------------------------------------------------

def offline_merge(out: Path, base: Path, deltas: dict[str, Path], template: dict,
                  domain_of: dict[str, str] | None = None) -> str:
    """Merges delta files with the engine, no network: the models in delta-id order (as
    every round participant lists them), per-domain parameters from the template.
    Returns the output's content id."""
    from hivemerge.merge.engine import run_merge
    from hivemerge.merge.recipe import validate_recipe

    per_domain = template.get("domain_parameters", {})
    models = []
    for delta_id in sorted(deltas):
        entry = {"model": str(deltas[delta_id])}
        params = per_domain.get((domain_of or {}).get(delta_id, ""), {})
        if params:
            entry["parameters"] = dict(params)
        models.append(entry)
    document = {k: v for k, v in template.items() if k in ("merge_method", "parameters", "dtype", "out_dtype", "seed")}
    document.update(base_model=str(base), models=models)
    run_merge(validate_recipe(document), out, device="cpu")
    return model_id_of(out)


# -- misbehaviour ------------------------------------------------------------------------

def tamper_stored_delta(node, delta_id: str) -> None:
    """Flips one byte in the data of ``node``'s stored delta and re-bundles it, so peers
    fetch the altered bytes without a single chunk failing its hash: only the delta's own
    verification can catch it."""
    from hivemerge.merge.deltas.delta import DeltaFile
    from hivemerge.protocol.errors import UserInputError

    path = node.store.resolve(delta_id)
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    position = 8 + header + (len(data) - 8 - header) // 2  # the middle of the data section
    data[position] ^= 0x5A
    path.write_bytes(bytes(data))
    try:
        DeltaFile(path).verify_all()
    except UserInputError:
        pass
    else:
        raise AssertionError("the flipped byte went unnoticed by the delta's own verification")
    old = node.store.bundle_of(delta_id)
    (node.store.bundles / f"{old}.json").unlink()  # only the new bundle is served and announced
    new = node.store.write_bundle(delta_id)
    assert new != old
    node.run(node.announce(), 30)
