"""``hivemerge pack make|verify|publish|list`` and ``hivemerge fuse``: heterogeneous experts' logit packs,
and fusing them into a pivot offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hivemerge.merge.deltas.codecs import parse_codec
from hivemerge.merge.fusion.distill import DistillConfig, fuse_into_pivot
from hivemerge.merge.fusion.fuse import METHODS as FUSION_METHODS
from hivemerge.merge.fusion.packs import PackError, PackFile, make_pack
from hivemerge.merge.fusion.probe import load_probe
from hivemerge.node.cli.connect import connect
from hivemerge.node.cli.options import (
    DomainFilterOption, HomeOption, JsonOption, OverwriteOption, PeerOption, SignerOption, json_flag,
)
from hivemerge.node.ui import err, print_table, tensor_progress
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fusion import DISTILLATION
from hivemerge.protocol.identity import Identity, default_home, fingerprint
from hivemerge.protocol.packs import MAX_TOP_K

app = typer.Typer(
    help="Logit packs: a heterogeneous expert's top-k next-token log-probabilities on a probe set, signed.",
    no_args_is_help=True,
)

ProbeOption = Annotated[Path, typer.Option("--probe", help="Probe set: JSONL of {\"prompt\": ..., \"response\": ...} lines.")]


@app.command()
def make(
    model_dir: Annotated[Path, typer.Argument(help="The expert: any causal LM directory (safetensors) with its own tokenizer.")],
    probe: ProbeOption,
    out: Annotated[Path, typer.Option("--out", help="The pack file to write (*.pack.safetensors).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Next tokens kept per response token.", min=1, max=MAX_TOP_K)] = 8,
    home: HomeOption = None,
) -> None:
    """Compute the expert's pack on the probe set, sign it with the home's identity, write it."""
    probe_set = load_probe(probe)
    identity = Identity.load(default_home(home))
    with tensor_progress("scoring") as progress:
        report = make_pack(model_dir, probe_set, out, identity, top_k, progress=progress)
    err.print(f"wrote {report.path} ({report.bytes:,} bytes, {report.tokens:,} response tokens, "
              f"{report.bytes_per_token:.1f} bytes/token) for probe {report.probe_id[:12]} in {report.seconds:.1f}s")
    print(report.pack_id)


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="The pack file.")],
    probe: Annotated[Optional[Path], typer.Option("--probe", help="Also check that it is for this probe set.")] = None,
    signer: SignerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a pack's signature and every hash; print its signer, probe, model and size."""
    pack = PackFile(file, expected_signer=signer)
    pack.load()
    if probe is not None:
        pack.check_probe(load_probe(probe))
    summary = {**pack.summary(), "verified": True, "probe_checked": probe is not None}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"pack       {summary['pack_id']}\n"
        f"signer     {summary['signer_fingerprint']} ({summary['signer']})\n"
        f"probe      {summary['probe_id']}" + ("  (matches --probe)" if probe is not None else "") + "\n"
        f"model      {summary['model_id']}\n"
        f"tokenizer  {summary['tokenizer_id']}\n"
        f"size       {summary['file_bytes']:,} bytes for {summary['tokens']:,} tokens of {summary['examples']:,} examples, "
        f"top-{summary['top_k']} ({summary['bytes_per_token']} bytes/token)\n"
        f"verified   signature and every hash OK"
    )


def fuse(
    pivot: Annotated[Path, typer.Option("--pivot", help="The pivot model directory (the round's base).")],
    packs: Annotated[list[Path], typer.Option("--packs", "--pack", help="A pack file (repeat for several experts).")],
    probe: ProbeOption,
    out: Annotated[Path, typer.Option("--out", help="The fused model directory to write (atomically).")],
    method: Annotated[str, typer.Option(help="mince: per token, the source with the lowest cross-entropy to the "
                                              "reference; avgce: their average weighted by softmax(-cross-entropy).")] = DISTILLATION["method"],
    lam: Annotated[float, typer.Option("--lambda", help="Weight of the reference-token loss; 1 - lambda goes to the fused distribution.")] = DistillConfig.lam,
    steps: Annotated[int, typer.Option(help="Distillation steps.", min=0)] = DistillConfig.steps,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW, warmup and cosine decay).")] = DistillConfig.lr,
    batch: Annotated[int, typer.Option(help="Examples per step.", min=1)] = DistillConfig.batch,
    seed: Annotated[int, typer.Option(help="Seeds the batch order.")] = DistillConfig.seed,
    replay: Annotated[Optional[Path], typer.Option(help="JSONL of the pivot's own domains (prompt, response) on which it is "
                                                          "kept as it was (self-distillation), so fusion costs them little.")] = None,
    replay_share: Annotated[float, typer.Option(help="Share of every batch drawn from --replay.")] = DistillConfig.replay_share,
    signer: Annotated[Optional[list[str]], typer.Option("--signer", help="Require every pack to be signed by one of these (repeatable).")] = None,
    delta_out: Annotated[Optional[Path], typer.Option("--delta-out", help="The signed delta against the pivot (default OUT.delta.safetensors).")] = None,
    no_delta: Annotated[bool, typer.Option("--no-delta", help="Write only the model directory (no identity needed).")] = False,
    codec: Annotated[str, typer.Option(help="Codec of the delta.")] = "int8",
    overwrite: OverwriteOption = False,
    as_json: Annotated[bool, json_flag("Print the fusion report as JSON.")] = False,
    home: HomeOption = None,
) -> None:
    """Fuse heterogeneous experts' logit packs into the pivot; write it and a signed delta.

    Each pack's response tokens are aligned with the pivot's (dynamic programming with
    edit-distance costs), its top-k candidates mapped onto the pivot's vocabulary, the
    sources fused per token (MinCE or AvgCE), and the pivot distilled with lambda * LM
    loss + (1 - lambda) * CE to the fused distribution. The delta (against the pivot,
    signed with the home's identity) joins weight merges like any expert's. Packs are
    checked first: signature, every hash, the probe id.
    """
    if method not in FUSION_METHODS:
        raise UserInputError(f"--method must be one of {list(FUSION_METHODS)}, got {method!r}")
    config = DistillConfig(lam=lam, steps=steps, lr=lr, batch=batch, seed=seed, replay_share=replay_share)
    config.check()
    parse_codec(codec)
    # Everything is checked before minutes of distillation: probe, packs, identity.
    probe_set = load_probe(probe)
    replay_set = load_probe(replay) if replay else None
    opened = []
    for path in packs:
        pack = _open_pack(path, signer)
        pack.check_probe(probe_set)
        opened.append(pack)
    identity = None if no_delta else Identity.load(default_home(home))
    if not no_delta and delta_out is None:
        delta_out = out.with_name(out.name + ".delta.safetensors")
    with tensor_progress("fusing") as progress:
        report = fuse_into_pivot(pivot, opened, probe_set, out, method, config, identity,
                                 None if no_delta else delta_out, codec, overwrite, replay_set,
                                 progress=lambda stage, done, total: progress(done, total, stage))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    cov = report.coverage
    err.print(
        f"fused {len(opened)} pack(s) with {method}: {cov['covered']:,} of {cov['tokens']:,} pivot tokens covered; "
        f"probe loss {report.before['lm']:.3f} -> {report.after['lm']:.3f} (reference), "
        f"{report.before['fused']:.3f} -> {report.after['fused']:.3f} (fused)"
        + (f"; replay drift {report.after['replay'] - report.before['replay']:+.3f}" if "replay" in report.after else "")
    )
    err.print(f"wrote {report.out_dir}" + (f" and {report.delta_path} (delta {report.delta_id[:12]})" if report.delta_path else "")
              + f" in {report.seconds:.1f}s")
    if not as_json and report.delta_id:
        print(report.delta_id)


def _open_pack(path: Path, signers: list[str] | None) -> PackFile:
    pack = PackFile(path)
    if signers and not {pack.signer, fingerprint(bytes.fromhex(pack.signer))} & set(signers):
        raise PackError(f"{path}: signed by {fingerprint(bytes.fromhex(pack.signer))}, not by any --signer given")
    return pack


@app.command("publish")
def publish_pack(
    file: Annotated[Path, typer.Argument(help="The pack file (hivemerge pack make).")],
    probe: ProbeOption,
    domain: Annotated[str, typer.Option("--domain", help="What the heterogeneous expert is good at, e.g. rotate.")],
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Store the pack and its probe set in the running node and advertise the pack: rounds
    with a fusion step (docs/fusion.md) name packs by domain or id."""
    with connect(home, None) as node:
        record = node.publish_pack(pack_file=str(file.resolve()), probe_file=str(probe.resolve()), domain=domain)
    if as_json:
        print(json.dumps(record, indent=2))
        return
    err.print(f"published {domain} pack {record['pack_id'][:12]} ({record['size']:,} bytes) for probe {record['probe_id'][:12]}")
    print(record["pack_id"])


@app.command("list")
def list_packs(
    domain: DomainFilterOption = None,
    as_json: JsonOption = False,
    home: HomeOption = None,
    peer: PeerOption = None,
) -> None:
    """The logit packs the network offers, from the DHT."""
    with connect(home, peer) as node:
        rows = node.packs(domain=domain)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_table(f"{len(rows)} pack(s)", ("domain", "pack", "probe", "model", "top-k", "size", "publisher"), [
        (r["domain"], r["pack_id"][:12], r["probe_id"][:12], r["model_id"][:12], str(r["top_k"]), f"{r['size']:,}", r["publisher"][:16])
        for r in rows
    ])
