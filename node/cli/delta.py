"""``hivemerge delta extract|apply|verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hivemerge.merge.deltas.codecs import CODECS, DEFAULT_CODEC
from hivemerge.merge.deltas.delta import DeltaFile, apply_delta, check_base, extract_delta
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.node.cli.options import HomeOption, JsonOption, OverwriteOption, SignerOption
from hivemerge.node.ui import err, tensor_progress
from hivemerge.protocol.identity import Identity, default_home


def _codec_help() -> str:
    lines = [f"Codecs (NAME or NAME:key=value,...; default {DEFAULT_CODEC}):\n\n"]
    for name, codec in sorted(CODECS.items()):
        if name == "same":
            continue
        opts = ", ".join(f"{o.name}={o.default}" for o in codec.options)
        lines.append(f"  {name}: {codec.summary}" + (f" Options: {opts}." if opts else "") + "\n\n")
    return "".join(lines)


app = typer.Typer(help="Signed weight deltas: expert minus base, encoded by a codec.", no_args_is_help=True)


@app.command(epilog=_codec_help())
def extract(
    base: Annotated[Path, typer.Option("--base", help="The base model directory.")],
    model: Annotated[Path, typer.Option("--model", help="The expert model directory (fine-tuned from the base), or a PEFT LoRA adapter of the base (stored as its factors).")],
    out: Annotated[Path, typer.Option("--out", help="The delta file to write (*.delta.safetensors).")],
    codec: Annotated[Optional[str], typer.Option("--codec", help="Codec, e.g. sign1, lossless, sparse:density=0.05.")] = None,
    home: HomeOption = None,
) -> None:
    """Encode (model - base), sign it with the home's identity, and write it."""
    identity = Identity.load(default_home(home))
    with tensor_progress("encoding") as progress:
        report = extract_delta(base, model, out, identity, codec or DEFAULT_CODEC, progress=progress)
    mix = ", ".join(f"{n} {c}" for n, c in sorted(report.codecs.items()))
    err.print(f"wrote {report.path} ({report.bytes:,} bytes; {mix}) in {report.seconds:.1f}s")
    print(report.delta_id)


@app.command()
def apply(
    base: Annotated[Path, typer.Option("--base", help="The base model directory the delta was made against.")],
    delta: Annotated[Path, typer.Option("--delta", help="The delta file.")],
    out: Annotated[Path, typer.Option("--out", help="The expert model directory to write.")],
    overwrite: OverwriteOption = False,
) -> None:
    """Check the delta (signature, base id, every hash), then rebuild the expert."""
    with tensor_progress("applying") as progress:
        summary = apply_delta(base, delta, out, overwrite=overwrite, progress=progress)
    exact = "bit-exact expert" if summary["exact"] else "approximate expert (lossy codec)"
    err.print(f"wrote {out}: {exact}, id {summary['rebuilt_id'][:12]}")


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="The delta file.")],
    base: Annotated[Optional[Path], typer.Option("--base", help="Also check that it applies to this base.")] = None,
    signer: SignerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a delta's signature and every hash; print its signer, base, codec mix and sizes."""
    delta = DeltaFile(file, expected_signer=signer)
    delta.verify_all()
    if base is not None:
        check_base(delta, SafetensorsModel(base))
    summary = {**delta.summary(), "verified": True, "base_checked": base is not None}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    mix = ", ".join(f"{n} {c}" for n, c in sorted(summary["codecs"].items()))
    fp16_bytes = summary["parameters"] * 2
    print(
        f"delta      {summary['delta_id']}\n"
        f"signer     {summary['signer_fingerprint']} ({summary['signer']})\n"
        f"base       {summary['base_id']}" + ("  (matches --base)" if base is not None else "") + "\n"
        f"expert     {summary['expert_id']}\n"
        f"codecs     {mix}\n"
        f"size       {summary['file_bytes']:,} bytes for {summary['parameters']:,} weights "
        f"({fp16_bytes / max(summary['file_bytes'], 1):.1f}x smaller than fp16)\n"
        f"verified   signature and {summary['tensors']} tensors' hashes OK"
    )
