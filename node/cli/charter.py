"""``hivemerge network new|show|add|remove|set|sign|publish``: a network's signed charter
(docs/charters.md) as a JSON file. Everything works offline on files, except ``show``
without a file and ``publish``, which talk to the node running on the home. The rules
themselves are in :mod:`hivemerge.protocol.charter`; this module reads and writes files
and says what a charter holds and whose signatures count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hivemerge.merge.io.atomic import write_file_atomic
from hivemerge.merge.methods import METHODS
from hivemerge.node import control
from hivemerge.node.cli.options import HomeOption, JsonOption, OverwriteOption
from hivemerge.protocol import bounds
from hivemerge.protocol.charter import (
    CharterError,
    charter_id,
    check_charter,
    document_of,
    genesis_ok,
    new_charter,
    propose_change,
    sign_charter,
    signers,
    successor_ok,
)
from hivemerge.protocol.charter_rules import needed_attestations
from hivemerge.protocol.content import is_content_id, parse_content_ref
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import KEY_FILE, Identity, default_home, fingerprint
from hivemerge.protocol.record_schemas import ROLES

app = typer.Typer(help="The network's signed charter: its bases, maintainers, roster (who may propose, contribute "
                       "and attest) and round policy.", no_args_is_help=True)

# A charter file is at most the largest charter (bounds.MAX_CHARTER_RECORD_BYTES, compact)
# written indented: a few times that. Reading stops there, whatever the file claims to be.
MAX_CHARTER_FILE_BYTES = 4 * bounds.MAX_CHARTER_RECORD_BYTES

KeyArgument = Annotated[str, typer.Argument(help="A public key: 64 hex characters (hivemerge identity show).")]
FromOption = Annotated[Path, typer.Option("--from", help="The current version (a charter file).")]
ChangeOutOption = Annotated[Optional[Path], typer.Option(
    "--out", help="Write the proposed version to this file (default: print it).")]
MaintainerOption = Annotated[Optional[list[str]], typer.Option(
    "--maintainer", help="A maintainer's public key (repeatable).")]
ThresholdOption = Annotated[Optional[int], typer.Option(
    "--threshold", help="How many maintainers must sign the next version (default: a majority).")]
MethodOption = Annotated[Optional[list[str]], typer.Option("--method", help="A merge method rounds may use (repeatable).")]
QuorumOption = Annotated[Optional[float], typer.Option(
    "--quorum", help="Share of the roster's attesters that must attest one result, in (0.5, 1].")]
MinAttestersOption = Annotated[Optional[int], typer.Option(
    "--min-attesters", help="And at least this many attesters.")]


# -- inputs -------------------------------------------------------------------------------

def public_key(text: str, what: str) -> str:
    """A public key as the charter spells it (lowercase hex), or a UserInputError."""
    key = text.strip().lower()
    if not is_content_id(key):
        raise UserInputError(f"{what} {text[:80]!r}: not a public key (64 hex characters, see hivemerge identity show)")
    return key


def public_keys(texts: list[str] | None, what: str) -> list[str]:
    return [public_key(text, what) for text in texts or ()]


def base_id(ref: str) -> str:
    """A base model's id: a model directory's (hashing it), or an id as given (ID or hm://ID)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        from hivemerge.merge.io.manifest import model_id  # heavy: hashes the model
        from hivemerge.merge.io.sources import SafetensorsModel

        return model_id(SafetensorsModel(path))
    cid = parse_content_ref(ref)
    if cid is None:
        raise UserInputError(f"--base {ref}: neither a model directory nor a model id (64 hex characters)")
    return cid


def methods(names: list[str] | None) -> list[str]:
    """The merge methods named (default: every registered one), each a registered method."""
    for name in names or ():
        if name not in METHODS:
            raise UserInputError(f"--method {name!r}: unknown; expected one of {sorted(METHODS)}")
    return sorted(set(names or METHODS))


def read_charter(path: Path) -> dict:
    """A signed charter from a file, checked against the schema (not its signatures)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CHARTER_FILE_BYTES + 1)
    except OSError as exc:
        raise UserInputError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CHARTER_FILE_BYTES:
        raise CharterError(f"{path}: over {MAX_CHARTER_FILE_BYTES:,} bytes, larger than any charter")
    try:
        signed = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested brackets
        raise CharterError(f"{path}: not JSON ({str(exc)[:80]})") from None
    try:
        return check_charter(signed)
    except CharterError as exc:
        raise CharterError(f"{path}: {exc}") from None


def check_out(path: Path, overwrite: bool) -> None:
    """Refuse an --out that exists (before any work, so that nothing is written on error)."""
    if path.is_dir():
        raise UserInputError(f"--out {path}: is a directory")
    if path.exists() and not overwrite:
        raise UserInputError(f"--out {path}: exists (pass --overwrite to replace it)")


def write_charter(path: Path, signed: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, (json.dumps(signed, indent=2) + "\n").encode())


def home_identity(home: Path | None) -> Identity | None:
    """The home's identity, or None if the home has none (a key others can read is an error)."""
    home = default_home(home)
    return Identity.load(home) if (home / KEY_FILE).exists() else None


def read_previous(previous: Path | None, signed: dict) -> dict | None:
    """The --previous file, which must be the version ``signed`` names as its previous."""
    if previous is None:
        return None
    document, prior = signed["charter"], read_charter(previous)
    if document["version"] == 0:
        raise UserInputError("--previous: this charter is a genesis (version 0); it has no previous version")
    if charter_id(prior["charter"]) != document["previous"]:
        raise UserInputError(f"--previous {previous}: is charter {charter_id(prior['charter'])[:12]} (version "
                             f"{prior['charter']['version']}), but this version's previous is {document['previous'][:12]}")
    return prior


def network_ref(ref: str) -> dict | str:
    """``node start --network``: a genesis id (ID or hm://ID) as given, or the signed genesis
    in a charter file, which must be version 0 signed by k of its own maintainers."""
    cid, path = parse_content_ref(ref), Path(ref).expanduser()
    if cid is not None and not path.exists():
        return cid
    if not path.is_file():
        raise UserInputError(f"--network {ref}: neither a charter file nor a network id (64 hex characters)")
    signed = read_charter(path)
    document = signed["charter"]
    if document["version"] != 0:
        raise CharterError(f"--network {ref}: version {document['version']}, not a genesis; start from the network's "
                           "genesis (version 0) or its id, and the node follows the later versions")
    if not genesis_ok(signed):
        counted = len(signers(signed, document["maintainers"]))
        raise CharterError(f"--network {ref}: signed by {counted} of its maintainers, {document['threshold']} needed "
                           "(hivemerge network sign)")
    return signed


# -- what a charter says --------------------------------------------------------------------

def describe(signed: dict, previous: dict | None = None) -> dict:
    """A charter's fields, its roster by role, and whose signatures count. The signatures of
    a genesis count by its own maintainers; an update's by the previous version's, known
    only with ``previous`` (else ``counting`` and ``needed`` are None)."""
    document = signed["charter"]
    valid = set(signers(signed, signed["signatures"]))
    deciding = document if document["version"] == 0 else (previous["charter"] if previous else None)
    described = {
        "id": charter_id(document), "name": document["name"], "version": document["version"],
        "previous": document["previous"], "base_ids": document["base_ids"], "maintainers": document["maintainers"],
        "threshold": document["threshold"],
        "roster": {role: sorted(k for k, roles in document["roster"].items() if role in roles) for role in ROLES},
        "open_contribution": document["open_contribution"], "policy": document["policy"],
        "attestations_needed": needed_attestations(document),
        "signatures": {key: "valid" if key in valid else "invalid" for key in signed["signatures"]},
        "counting": None if deciding is None else sorted(valid & set(deciding["maintainers"])),
        "needed": None if deciding is None else deciding["threshold"],
        "genesis_ok": genesis_ok(signed),
    }
    if previous is not None:
        described["successor_ok"] = successor_ok(previous, signed)
    return described


def _key_line(key: str) -> str:
    return f"{fingerprint(bytes.fromhex(key))}  {key}"


def _signature_lines(d: dict) -> list[str]:
    decided = "this version's maintainers" if d["version"] == 0 else f"version {d['version'] - 1}'s maintainers"
    lines = [f"signatures   count when by {decided}"]
    for key, state in d["signatures"].items():
        if state == "invalid":
            verdict = "bad signature: does not count"
        elif d["counting"] is None:
            verdict = f"valid; counts if one of {decided} (pass --previous FILE)"
        else:
            verdict = "counts" if key in d["counting"] else f"valid, but not one of {decided}: does not count"
        lines.append(f"  {_key_line(key)}  {verdict}")
    if d["counting"] is not None:
        valid = d["genesis_ok"] if d["version"] == 0 else d.get("successor_ok")
        as_what = "a genesis" if d["version"] == 0 else f"the next version of version {d['version'] - 1}"
        lines.append(f"  {len(d['counting'])} counting, {d['needed']} needed: "
                     f"{'valid as ' + as_what if valid else 'not (yet) valid as ' + as_what}")
    return lines


def print_description(d: dict) -> None:
    policy = d["policy"]
    lines = [
        f"network      {d['name']}",
        f"charter      {d['id']}",
        f"version      {d['version']} " + ("(genesis)" if d["previous"] is None else f"(previous {d['previous']})"),
        *(f"{'bases' if i == 0 else '':<13}{base}" for i, base in enumerate(d["base_ids"])),
        f"maintainers  {len(d['maintainers'])}, of whom {d['threshold']} must sign the next version",
        *(f"  {_key_line(key)}" for key in d["maintainers"]),
        *_signature_lines(d),
        f"roster       {sum(map(len, d['roster'].values()))} role(s); any key may contribute: "
        f"{'yes' if d['open_contribution'] else 'no'}",
        *(f"  {role:<12}{_key_line(key)}" for role in ROLES for key in d["roster"][role]),
        f"policy       methods {', '.join(policy['methods'])}",
        f"             final with {d['attestations_needed']} of the {len(d['roster']['attester'])} attesters "
        f"(quorum {policy['quorum']:.4g}, at least {policy['min_attesters']})",
        f"             deadline {policy['min_deadline']:g}-{policy['max_deadline']:g} s, fetch window up to "
        f"{policy['max_fetch_window']:g} s, up to {policy['max_deltas']} deltas",
        f"             search up to {policy['max_generations']} generations of {policy['max_popsize']}, "
        f"fusion up to {policy['max_fusion_steps']} steps",
    ]
    print("\n".join(lines))


def _tally(signed: dict, deciding: dict | None) -> str:
    """How many of the signatures needed the charter has, where that is known offline."""
    if deciding is None:
        return (f"{len(signed['signatures'])} signature(s); they count if by version "
                f"{signed['charter']['version'] - 1}'s maintainers (pass --previous FILE to check)")
    document = document_of(deciding)
    return f"signatures: {len(signers(signed, document['maintainers']))} counting, {document['threshold']} needed"


def _emit(signed: dict, out: Path | None, deciding: dict | None) -> None:
    """Writes (or prints) a new or changed charter and says what it is on stderr."""
    document = signed["charter"]
    cid = charter_id(document)
    summary = f"network {document['name']} version {document['version']}, charter {cid}; {_tally(signed, deciding)}"
    if out is None:
        print(json.dumps(signed, indent=2))
        print(summary, file=sys.stderr)
        return
    write_charter(out, signed)
    print(cid)
    print(f"wrote {out}: {summary}", file=sys.stderr)


def _signed_by_home(charter: dict, identity: Identity | None, maintainers: list[str]) -> dict:
    # The home signs only where its signature counts: a signature that cannot count is noise.
    return sign_charter(charter, identity) if identity is not None and identity.public_hex in maintainers else charter


# -- commands -------------------------------------------------------------------------------

@app.command()
def new(
    name: Annotated[str, typer.Option("--name", help="The network's name (letters, digits, . _ -).")],
    base: Annotated[list[str], typer.Option("--base", help="A base model: its directory or its id (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the charter (e.g. charter.json).")],
    maintainer: MaintainerOption = None,
    threshold: ThresholdOption = None,
    method: MethodOption = None,
    quorum: QuorumOption = None,
    min_attesters: MinAttestersOption = None,
    proposer: Annotated[Optional[list[str]], typer.Option("--proposer", help="A key that may propose rounds.")] = None,
    attester: Annotated[Optional[list[str]], typer.Option("--attester", help="A key whose attestations count.")] = None,
    contributor: Annotated[Optional[list[str]], typer.Option("--contributor", help="A key that may commit deltas.")] = None,
    open_contribution: Annotated[bool, typer.Option("--open-contribution", help="Let any key contribute.")] = False,
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
) -> None:
    """Write a new network's genesis charter (version 0).

    Signed by the home's key if it is a maintainer. Maintainers default to the home's key,
    methods to every registered one; without any --proposer/--attester/--contributor, the
    maintainers hold every role."""
    check_out(out, overwrite)
    maintainers = public_keys(maintainer, "--maintainer")
    roster: dict[str, set[str]] = {}
    for role, keys in (("proposer", proposer), ("attester", attester), ("contributor", contributor)):
        for key in public_keys(keys, f"--{role}"):
            roster.setdefault(key, set()).add(role)
    identity = home_identity(home)
    if not maintainers:
        if identity is None:
            raise UserInputError(f"no identity in {default_home(home)} to be the maintainer: pass --maintainer KEY or "
                                 "create one (hivemerge identity new)")
        maintainers = [identity.public_hex]
    if not roster:
        roster = {key: set(ROLES) for key in maintainers}
    policy = {key: value for key, value in (("quorum", quorum), ("min_attesters", min_attesters)) if value is not None}
    allowed = methods(method)
    charter = new_charter(name=name, base_ids=sorted({base_id(ref) for ref in base}), maintainers=maintainers,
                          methods=allowed, threshold=threshold, roster=roster, open_contribution=open_contribution,
                          **policy)
    charter = _signed_by_home(charter, identity, charter["charter"]["maintainers"])
    _emit(charter, out, charter)


@app.command()
def show(
    file: Annotated[Optional[Path], typer.Argument(help="A charter file (default: the charter the node follows).")] = None,
    previous: Annotated[Optional[Path], typer.Option(
        "--previous", help="The version before FILE's, to check whose signatures count.")] = None,
    as_json: JsonOption = False,
    home: HomeOption = None,
) -> None:
    """What a charter says and whose signatures count.

    Without FILE: the charter the node running on the home follows."""
    if file is None:
        if previous is not None:
            raise UserInputError("--previous needs a charter FILE")
        return _show_followed(default_home(home), as_json)
    signed = read_charter(file)
    described = describe(signed, read_previous(previous, signed))
    if as_json:
        print(json.dumps(described, indent=2))
    else:
        print_description(described)


def _show_followed(home: Path, as_json: bool) -> None:
    try:
        status = control.call(home, "charter_status", {})
    except control.NodeUnavailable as exc:
        raise UserInputError(f"{exc}; pass a charter FILE, or start the node (hivemerge node start)") from None
    signed = status.get("charter")
    # The node followed this version from its genesis: its signatures were checked there.
    described = None if signed is None else describe(check_charter(signed))
    if as_json:
        print(json.dumps({**status, "charter": described}, indent=2))
    elif described is None:
        print(f"the node on {home} runs a private test network without a charter")
    else:
        print(f"the node on {home} follows version {status.get('version')} of network {described['name']} "
              f"(genesis {status.get('genesis_id')})")
        print_description(described)


def _change(current: Path, out: Path | None, overwrite: bool, home: Path | None, **change: Any) -> None:
    if out is not None:
        check_out(out, overwrite)
    signed = read_charter(current)
    proposed = propose_change(signed, **change)
    proposed = _signed_by_home(proposed, home_identity(home), signed["charter"]["maintainers"])
    _emit(proposed, out, signed)


def _roles(role: list[str] | None) -> list[str]:
    if not role:
        raise UserInputError(f"--role: name at least one of {list(ROLES)}")
    return role


@app.command()
def add(
    key: KeyArgument,
    current: FromOption,
    role: Annotated[Optional[list[str]], typer.Option(
        "--role", help=f"A role to give it: {', '.join(ROLES)} (repeatable).")] = None,
    out: ChangeOutOption = None,
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
) -> None:
    """Propose the next version, with KEY given these roles.

    Signed by the home's key if it is a maintainer of the current version; the other
    maintainers add theirs with `network sign`."""
    _change(current, out, overwrite, home, add={public_key(key, "KEY"): _roles(role)})


@app.command()
def remove(
    key: KeyArgument,
    current: FromOption,
    role: Annotated[Optional[list[str]], typer.Option("--role", help="Take only this role (repeatable; default: all).")] = None,
    out: ChangeOutOption = None,
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
) -> None:
    """Propose the next version, with KEY off the roster (or without these roles).

    Its later records stop counting once the version is adopted."""
    key = public_key(key, "KEY")
    _change(current, out, overwrite, home, remove={key: role} if role else [key])


@app.command("set")
def set_policy(
    current: FromOption,
    maintainer: Annotated[Optional[list[str]], typer.Option(
        "--maintainer", help="The next version's maintainers (repeatable; replaces the list).")] = None,
    threshold: ThresholdOption = None,
    method: Annotated[Optional[list[str]], typer.Option(
        "--method", help="The merge methods rounds may use (repeatable; replaces the list).")] = None,
    quorum: QuorumOption = None,
    min_attesters: MinAttestersOption = None,
    open_contribution: Annotated[Optional[bool], typer.Option(
        "--open-contribution/--closed-contribution", help="Let any key contribute, or only the roster's contributors.",
        show_default=False)] = None,
    out: ChangeOutOption = None,
    overwrite: OverwriteOption = False,
    home: HomeOption = None,
) -> None:
    """Propose the next version with other maintainers, threshold or round policy."""
    changes: dict[str, Any] = {"threshold": threshold, "quorum": quorum, "min_attesters": min_attesters,
                               "open_contribution": open_contribution}
    if maintainer:
        changes["maintainers"] = sorted(set(public_keys(maintainer, "--maintainer")))
    if method:
        changes["methods"] = methods(method)
    changes = {field: value for field, value in changes.items() if value is not None}
    if not changes:
        raise UserInputError("nothing to change: pass --maintainer, --threshold, --method, --quorum, --min-attesters "
                             "or --open-contribution/--closed-contribution")
    _change(current, out, overwrite, home, **changes)


@app.command()
def sign(
    file: Annotated[Path, typer.Argument(help="The charter file; the signature is added in place.")],
    previous: Annotated[Optional[Path], typer.Option(
        "--previous", help="For an update: the version before it, whose maintainers' signatures count.")] = None,
    home: HomeOption = None,
) -> None:
    """Add the home's signature to a charter file (in place, atomically)."""
    signed = read_charter(file)
    prior = read_previous(previous, signed)
    identity = home_identity(home)
    if identity is None:
        raise UserInputError(f"no identity in {default_home(home)} to sign with (hivemerge identity new)")
    document = signed["charter"]
    deciding = document if document["version"] == 0 else (prior["charter"] if prior else None)
    if deciding is None:
        print(f"warning: your signature counts only if you are a maintainer of version {document['version'] - 1} "
              "(pass --previous FILE to check)", file=sys.stderr)
    elif identity.public_hex not in deciding["maintainers"]:
        which = "this genesis" if deciding is document else f"version {deciding['version']}"
        print(f"warning: {identity.fingerprint} is not a maintainer of {which}: its signature does not count",
              file=sys.stderr)
    signed = sign_charter(signed, identity)
    write_charter(file, signed)
    print(charter_id(document))
    print(f"signed {file} as {identity.fingerprint}; {_tally(signed, deciding)}", file=sys.stderr)


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(help="The signed charter file.")],
    as_json: JsonOption = False,
    home: HomeOption = None,
) -> None:
    """Hand a signed version to the node running on the home.

    The node adopts it if it is the next valid version of its network, and publishes it."""
    signed = read_charter(file)
    home = default_home(home)
    try:
        answer = control.call(home, "publish_charter", {"charter": signed})
    except control.NodeUnavailable as exc:
        raise UserInputError(f"{exc}; start it first (hivemerge node start --network ...)") from None
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    answer = answer if isinstance(answer, dict) else {"answer": answer}
    verdict = "adopted" if answer.get("adopted") else "stored, not adopted"
    following = f"; the node follows version {answer['version']}" if "version" in answer else ""
    reason = f" ({answer['reason']})" if answer.get("reason") else ""
    print(f"{verdict}: charter {charter_id(signed['charter'])[:12]} version {signed['charter']['version']}"
          f"{following}{reason}")
