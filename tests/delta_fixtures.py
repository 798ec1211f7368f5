"""Helpers for the identity, content-id and delta tests: tiny synthetic models, delta
file surgery, and a fast way to run the real CLI many times.

The CLI runs through :class:`cli_runner.CliRunner` (one shared driver per session).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from cli_runner import CliResult, CliRunner  # noqa: F401  (re-exported for the tests)
from conftest import write_tensors

from hivemerge.protocol.identity import Identity
from hivemerge.protocol.signing import sign_manifest

# -- tiny models -------------------------------------------------------------------

CONFIG = {"architectures": ["TinyForTest"], "model_type": "tiny", "num_hidden_layers": 2, "hidden_size": 16}


def family_shapes(hidden: int = 16) -> dict[str, tuple[int, ...]]:
    return {
        "model.embed_tokens.weight": (24, hidden),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.1.mlp.up_proj.weight": (32, hidden),
        "model.layers.1.post_attention_layernorm.weight": (hidden,),
        "lm_head.weight": (24, hidden),
    }


def random_tensors(seed: int, shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.5).to(dtype) for n, s in shapes.items()}


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """An 'expert': every tensor of ``base`` plus small noise (in float32, cast back)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype) for n, t in base.items()
    }


def save_model(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = CONFIG) -> Path:
    directory = write_tensors(directory, tensors, config)
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return directory


def load_dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from hivemerge.merge.io.sources import SafetensorsModel

    model = SafetensorsModel(directory)
    return {n: model.get(n) for n in model.names()}


# -- delta file surgery ------------------------------------------------------------

def read_container(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_container(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file laid out exactly as hivemerge writes one (canonical header)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Path(path)


def rewrite_signed(src: Path, dst: Path, change) -> Path:
    """Copy a delta file with its signed manifest replaced by ``change(signed) -> signed``."""
    header, data = read_container(src)
    signed = json.loads(header["__metadata__"]["hivemerge.delta"])
    header["__metadata__"]["hivemerge.delta"] = json.dumps(change(signed), sort_keys=True, separators=(",", ":"))
    return write_container(dst, header, data)


def forge_side_file(src: Path, dst: Path, identity: Identity, old: str, new: str) -> Path:
    """A copy of delta ``src`` whose side file ``old`` is stored and listed as ``new``, its
    manifest signed by ``identity``: a publisher's own valid signature over a hostile name."""
    header, data = read_container(src)
    signed = json.loads(header["__metadata__"]["hivemerge.delta"])
    manifest = signed["manifest"]
    manifest["files"] = {(new if k == old else k): v for k, v in manifest["files"].items()}
    header = {(f"__files__/{new}" if k == f"__files__/{old}" else k): v for k, v in header.items()}
    header["__metadata__"]["hivemerge.delta"] = json.dumps(
        sign_manifest(identity, "delta", manifest), sort_keys=True, separators=(",", ":"))
    return write_container(dst, header, data)


def resign(signed: dict, identity: Identity, keep_signer: bool = False) -> dict:
    """The same manifest signed by ``identity``; with ``keep_signer`` the signer field still names the original key."""
    fresh = sign_manifest(identity, signed["kind"], signed["manifest"])
    if keep_signer:
        fresh["signer"] = signed["signer"]
    return fresh


# -- the CLI -----------------------------------------------------------------------

def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, exactly one stderr line, starting with ``error: ``, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


_RUNNER: CliRunner | None = None


def shared_runner(tmp_path_factory) -> CliRunner:
    """One CLI driver for the whole session (each test module's ``cli`` fixture calls this)."""
    global _RUNNER
    if _RUNNER is None:
        import atexit

        _RUNNER = CliRunner(tmp_path_factory.mktemp("cli-runs"))
        atexit.register(_RUNNER.close)
    return _RUNNER


# -- a shared family of tiny models and identities ---------------------------------------

@dataclass
class Family:
    root: Path
    base: Path  # float32
    expert: Path  # base + noise
    expert2: Path  # another expert of the same base
    wrong_base: Path  # same architecture, other weights
    base_fp16: Path  # the base's values in float16: same architecture, another id
    other_arch: Path  # hidden size 8 instead of 16
    nan_expert: Path  # one NaN in one tensor
    inf_expert: Path  # one -Inf
    alice_home: Path
    bob_home: Path
    alice: Identity
    bob: Identity


def build_family(root: Path) -> Family:
    shapes = family_shapes()
    base = random_tensors(0, shapes)
    expert = perturbed(base, 1)
    nan = {n: t.clone() for n, t in expert.items()}
    nan["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    inf = {n: t.clone() for n, t in expert.items()}
    inf["model.layers.0.input_layernorm.weight"][2] = float("-inf")
    homes = {}
    for who in ("alice", "bob"):
        identity = Identity.generate()
        identity.save(root / f"home-{who}")
        homes[who] = (root / f"home-{who}", identity)
    return Family(
        root=root,
        base=save_model(root / "base", base),
        expert=save_model(root / "expert", expert),
        expert2=save_model(root / "expert2", perturbed(base, 2)),
        wrong_base=save_model(root / "wrong-base", random_tensors(9, shapes)),
        base_fp16=save_model(root / "base-fp16", {n: t.half() for n, t in base.items()}),
        other_arch=save_model(root / "other-arch", random_tensors(0, family_shapes(8))),
        nan_expert=save_model(root / "nan-expert", nan),
        inf_expert=save_model(root / "inf-expert", inf),
        alice_home=homes["alice"][0], bob_home=homes["bob"][0], alice=homes["alice"][1], bob=homes["bob"][1],
    )


_FAMILY: Family | None = None


def shared_family(tmp_path_factory) -> Family:
    global _FAMILY
    if _FAMILY is None:
        _FAMILY = build_family(tmp_path_factory.mktemp("delta-family"))
    return _FAMILY


def tiny_pair(root: Path) -> tuple[Path, Path]:
    """A base and an expert small enough that every byte of their delta can be flipped in a test."""
    g = torch.Generator().manual_seed(4)
    base = {
        "layers.0.w": torch.randn(4, 6, generator=g),
        "layers.0.norm": torch.randn(6, generator=g).half(),
        "layers.1.w": torch.randn(2, 6, generator=g).to(torch.bfloat16),
        "position_ids": torch.arange(3),
    }
    expert = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype) if t.is_floating_point() else t
              for n, t in base.items()}
    base_dir = write_tensors(root / "tiny-base", base, {"num_hidden_layers": 2})
    expert_dir = write_tensors(root / "tiny-expert", expert, {"num_hidden_layers": 2, "note": "expert"})
    return base_dir, expert_dir
