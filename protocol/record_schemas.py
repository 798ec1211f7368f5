"""One strict schema per DHT record kind: every field, its type, its range, nested.

A record's fields are validated against its kind's model before any of them is used, by
the DHT validator on every store and lookup, and again by every reader
(:func:`hivemerge.protocol.records.open_record`). Strict: no coercion (``"1"`` is not 1,
``true`` is not 1), no extra keys, no NaN or infinity, every list and mapping bounded
(:mod:`hivemerge.protocol.bounds`). Rules that span fields (a proposal's deadline within
its window, a commitment's domains naming exactly its deltas) are model validators.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from hivemerge.protocol import bounds, fusion, search
from hivemerge.protocol.content import content_id
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.packs import MAX_TOP_K

ContentId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
PublicKey = ContentId  # an Ed25519 public key in lowercase hex has the same form
PeerId = Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")]  # base58
DOMAIN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Domain = Annotated[str, StringConstraints(pattern=DOMAIN_PATTERN)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]  # methods, parameters, codecs, dtypes
Maddr = Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]*$", max_length=bounds.MAX_MADDR_CHARS)]
Reason = Annotated[str, StringConstraints(max_length=bounds.MAX_REASON_CHARS)]
Timestamp = Annotated[float, Field(ge=0.0, le=1e11)]  # seconds since the epoch (1e11: year 5138)
Count = Annotated[int, Field(ge=0)]


def check_domain(domain: Any) -> str:
    """An expert's or a pack's domain as every record states it (raises UserInputError)."""
    if not isinstance(domain, str) or re.fullmatch(DOMAIN_PATTERN, domain) is None:
        raise UserInputError(f"--domain: {domain!r} must be 1-64 ASCII letters, digits, - or _")
    if domain == fusion.FUSED_DOMAIN:
        raise UserInputError(f"--domain: {domain!r} is reserved for fused deltas")
    return domain


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


# -- recipe parameters (the weight merge part of a round template) ----------------------
Scalar = bool | int | float
Gradient = Annotated[list[Scalar], Field(min_length=1, max_length=bounds.MAX_LAYERS)]


class LayerTable(Strict):
    """A per-layer table: one value per layer (None: the default) and the default."""
    per_layer: Annotated[list[Scalar | None], Field(max_length=bounds.MAX_LAYERS)]
    default: Scalar | None


class FilteredValue(Strict):
    filter: Annotated[str, StringConstraints(max_length=bounds.MAX_FILTER_CHARS)] | None = None
    value: Scalar | Gradient | LayerTable


ParamValue = Scalar | Gradient | Annotated[list[FilteredValue], Field(min_length=1, max_length=bounds.MAX_FILTERS)] | LayerTable
Parameters = Annotated[dict[Name, ParamValue], Field(max_length=bounds.MAX_PARAMETERS)]


class RoundTemplate(Strict):
    """A proposal's recipe: the round recipe's keys that every participant merges by."""
    merge_method: Name
    parameters: Parameters | None = None
    dtype: Name | None = None
    out_dtype: Name | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    domain_parameters: Annotated[dict[Domain, Parameters], Field(max_length=bounds.MAX_DOMAINS)] | None = None
    fetch_window: Annotated[float, Field(ge=1.0, le=bounds.MAX_FETCH_WINDOW)] | None = None
    fusion: dict[str, Any] | None = None

    @field_validator("fusion")
    @classmethod
    def _complete_fusion_block(cls, block: dict | None) -> dict | None:
        # A proposal states every fusion setting (defaults filled in), within the protocol's bounds.
        if block is not None:
            try:
                if fusion.check_fusion_block(block, resolved=True) != block:
                    raise ValueError("fusion: the block must state every setting")
            except UserInputError as exc:
                raise ValueError(str(exc)) from None
        return block


class Select(Strict):
    domains: Annotated[list[Domain], Field(min_length=1, max_length=bounds.MAX_SELECTED)] | None = None
    deltas: Annotated[list[ContentId], Field(min_length=1, max_length=bounds.MAX_SELECTED)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Select":
        if (self.domains is None) == (self.deltas is None):
            raise ValueError("select names either domains or deltas")
        return self


class Signed(Strict):
    """What every record carries: when its owner signed it and until when it may be stored."""
    issued_at: Timestamp
    expires_at: Timestamp

    @model_validator(mode="after")
    def _expiry_within_lifetime(self) -> "Signed":
        if not self.issued_at <= self.expires_at <= bounds.longest_expiry(self.issued_at, getattr(self, "deadline", 0.0)):
            raise ValueError("expires_at must lie between issued_at and the record's longest lifetime")
        return self


class Contact(Signed):
    peer_id: PeerId
    maddrs: Annotated[list[Maddr], Field(max_length=bounds.MAX_MADDRS)]


class Expert(Contact):
    domain: Domain
    base_id: ContentId
    architecture: ContentId
    expert_id: ContentId
    delta_id: ContentId
    bundle_id: ContentId
    codecs: Annotated[dict[Name, Annotated[int, Field(ge=0, le=bounds.MAX_TENSORS)]], Field(max_length=bounds.MAX_CODECS)]
    size: Annotated[int, Field(ge=0, le=bounds.MAX_OBJECT_BYTES)]


class Provider(Contact):
    content: ContentId
    bundle_id: ContentId


class Proposal(Signed):
    round_id: ContentId
    base_id: ContentId
    recipe: RoundTemplate
    select: Select
    deadline: Timestamp
    quorum: Annotated[float, Field(gt=0.0, le=1.0)]
    proposer: PublicKey

    @model_validator(mode="after")
    def _window(self) -> "Proposal":
        if not self.deadline <= self.issued_at + bounds.MAX_DEADLINE_SECONDS:
            raise ValueError(f"deadline more than {bounds.MAX_DEADLINE_SECONDS:g} s after issued_at")
        return self


class SearchProposal(Proposal):
    search: dict[str, Any]

    @field_validator("search")
    @classmethod
    def _complete_settings(cls, settings: dict) -> dict:
        # Every node must run the values the proposal states: complete and within bounds.
        try:
            if search.check_settings(settings) != settings:
                raise ValueError("search: the settings must state every value")
        except UserInputError as exc:
            raise ValueError(str(exc)) from None
        return settings


class Commitment(Contact):
    round_id: ContentId
    delta_ids: Annotated[list[ContentId], Field(min_length=1, max_length=bounds.MAX_COMMITTED)]
    domains: dict[ContentId, Domain]

    @model_validator(mode="after")
    def _domains_name_the_deltas(self) -> "Commitment":
        if self.delta_ids != sorted(set(self.delta_ids)) or set(self.domains) != set(self.delta_ids):
            raise ValueError("delta_ids must be sorted and distinct, and domains name exactly them")
        return self


class Attestation(Contact):
    round_id: ContentId
    result_id: ContentId
    bundle_id: ContentId
    included: Annotated[list[ContentId], Field(max_length=bounds.MAX_ROUND_DELTAS)]
    excluded: Annotated[dict[ContentId, Reason], Field(max_length=bounds.MAX_ROUND_DELTAS)]


Generation = Annotated[int, Field(ge=0, lt=bounds.MAX_GENERATIONS)]
Candidates = Annotated[list[ContentId], Field(min_length=1, max_length=bounds.MAX_POPSIZE + 1)]


class CandidateList(Signed):
    """A search generation's candidates (the proposer's); scores and tallies name them too."""
    round_id: ContentId
    generation: Generation
    candidate_ids: Candidates


class Scores(CandidateList):
    scores: Annotated[list[float], Field(min_length=1, max_length=bounds.MAX_POPSIZE + 1)]
    examples: Annotated[int, Field(ge=0, le=bounds.MAX_EXAMPLES)]

    @model_validator(mode="after")
    def _one_score_per_candidate(self) -> "Scores":
        if len(self.scores) != len(self.candidate_ids):
            raise ValueError("scores must be one finite number per candidate")
        return self


class Tally(CandidateList):
    scorers: Annotated[list[PublicKey], Field(max_length=bounds.MAX_SCORERS)]

    @model_validator(mode="after")
    def _sorted_scorers(self) -> "Tally":
        if self.scorers != sorted(set(self.scorers)):
            raise ValueError("scorers must be sorted, distinct public keys (64 hex digits)")
        return self


class Pack(Contact):
    domain: Domain
    pack_id: ContentId
    probe_id: ContentId
    model_id: ContentId
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)]
    bundle_id: ContentId
    probe_bundle_id: ContentId
    size: Annotated[int, Field(ge=0, le=bounds.MAX_OBJECT_BYTES)]


class FusionReport(Contact):
    round_id: ContentId
    delta_id: ContentId
    packs: Annotated[list[ContentId], Field(min_length=1, max_length=bounds.MAX_PACKS)]
    probe_id: ContentId
    replay_id: ContentId | None
    before: dict[str, float]
    after: dict[str, float]

    @model_validator(mode="after")
    def _figures(self) -> "FusionReport":
        replay = self.replay_id is not None
        if not (fusion.check_figures(self.before, replay) and fusion.check_figures(self.after, replay)):
            raise ValueError("before and after must be finite figures {lm, fused} (and replay exactly when a replay set "
                             "is named)")
        return self


class Participants(Signed):
    """The proposer's list, after the deadline, of the on-time commitments it accepted:
    committer -> that commitment's ``domains`` (delta id -> domain), which names its deltas."""
    round_id: ContentId
    participants: Annotated[dict[PublicKey, Annotated[dict[ContentId, Domain], Field(min_length=1, max_length=bounds.MAX_COMMITTED)]],
                            Field(max_length=bounds.MAX_ROUND_DELTAS)]

    @model_validator(mode="after")
    def _bounded_deltas(self) -> "Participants":
        if sum(len(domains) for domains in self.participants.values()) > bounds.MAX_ROUND_DELTAS:
            raise ValueError(f"participants may name at most {bounds.MAX_ROUND_DELTAS} deltas in all")
        return self


# -- charters (rules: protocol/charter.py, protocol/charter_rules.py; docs/charters.md) --------
ROLES = ("attester", "contributor", "proposer")
Role = Literal[ROLES]
NetworkName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]  # never a path
SignatureHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Window = Annotated[float, Field(ge=1.0, le=bounds.MAX_DEADLINE_SECONDS)]


def _sorted_distinct(values: list, what: str) -> list:
    # One spelling per meaning: the same charter always has the same id.
    if values != sorted(set(values)):
        raise ValueError(f"{what} must be sorted and distinct")
    return values


class RoundPolicy(Strict):
    """What every round of the network must respect; a proposal cannot raise any of it."""
    methods: Annotated[list[Name], Field(min_length=1, max_length=bounds.MAX_CHARTER_METHODS)]
    quorum: Annotated[float, Field(gt=0.5, le=1.0)]  # share of the roster's attesters; > 1/2: one final result
    min_attesters: Annotated[int, Field(ge=1, le=bounds.MAX_ROSTER)]
    min_deadline: Window  # seconds from a proposal to its deadline
    max_deadline: Window
    max_fetch_window: Annotated[float, Field(ge=1.0, le=bounds.MAX_FETCH_WINDOW)]
    max_deltas: Annotated[int, Field(ge=1, le=bounds.MAX_ROUND_DELTAS)]
    max_generations: Annotated[int, Field(ge=1, le=bounds.MAX_GENERATIONS)]
    max_popsize: Annotated[int, Field(ge=2, le=bounds.MAX_POPSIZE)]
    max_fusion_steps: Annotated[int, Field(ge=1, le=bounds.MAX_FUSION_STEPS)]

    @model_validator(mode="after")
    def _consistent(self) -> "RoundPolicy":
        _sorted_distinct(self.methods, "methods")
        if self.min_deadline > self.max_deadline:
            raise ValueError("min_deadline must not exceed max_deadline")
        return self


class Charter(Strict):
    """One version of a network's charter; its id is the content id of this document."""
    name: NetworkName
    base_ids: Annotated[list[ContentId], Field(min_length=1, max_length=bounds.MAX_CHARTER_BASES)]
    maintainers: Annotated[list[PublicKey], Field(min_length=1, max_length=bounds.MAX_MAINTAINERS)]
    threshold: Annotated[int, Field(ge=1, le=bounds.MAX_MAINTAINERS)]
    roster: Annotated[dict[PublicKey, Annotated[list[Role], Field(min_length=1, max_length=len(ROLES))]],
                      Field(max_length=bounds.MAX_ROSTER)]
    open_contribution: bool
    policy: RoundPolicy
    version: Annotated[int, Field(ge=0, le=bounds.MAX_CHARTER_VERSION)]
    previous: ContentId | None

    @model_validator(mode="after")
    def _consistent(self) -> "Charter":
        _sorted_distinct(self.base_ids, "base_ids")
        _sorted_distinct(self.maintainers, "maintainers")
        for roles in self.roster.values():
            _sorted_distinct(roles, "roster roles")
        if self.threshold > len(self.maintainers):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.maintainers)} maintainers")
        if (self.version == 0) != (self.previous is None):
            raise ValueError("previous must name the previous version's id, and only the genesis (version 0) has none")
        attesters = sum("attester" in roles for roles in self.roster.values())
        if self.policy.min_attesters > attesters:  # no round could ever be final
            raise ValueError(f"policy.min_attesters {self.policy.min_attesters} exceeds the roster's {attesters} attesters")
        return self


class SignedCharter(Strict):
    charter: Charter
    signatures: Annotated[dict[PublicKey, SignatureHex], Field(max_length=bounds.MAX_MAINTAINERS)]


class CharterRecord(Signed):
    """A version of a network's charter, published under the network's key (its genesis id)."""
    genesis_id: ContentId
    charter_id: ContentId
    charter: SignedCharter

    @model_validator(mode="before")
    @classmethod
    def _names_its_charter(cls, data: Any) -> Any:
        # On the raw fields: the id is of the document as signed, not as the model reads it.
        if isinstance(data, dict) and isinstance(data.get("charter"), dict):
            document = data["charter"].get("charter")
            try:
                cid = content_id(document)
            except (TypeError, ValueError, RecursionError):
                cid = None
            if cid != data.get("charter_id"):
                raise ValueError("charter_id must be the content id of the charter")
            if isinstance(document, dict) and document.get("version") == 0 and data.get("genesis_id") != cid:
                raise ValueError("a genesis charter is stored under its own id")
        return data


# Fields whose rule reads better stated than as the schema's first complaint.
FIELD_RULES = {
    "candidate_ids": "must be content ids",
    "delta_ids": "must be content ids",
    "included": "must be content ids",
    "packs": "must be content ids",
    "scorers": "must be sorted, distinct public keys (64 hex digits)",
    "scores": "must be one finite number per candidate",
    "generation": f"must be non-negative and below {bounds.MAX_GENERATIONS}",
    "maddrs": f"must be at most {bounds.MAX_MADDRS} multiaddresses (strings starting with /)",
}


def describe(errors: list[dict]) -> str:
    """One line for the first schema error: the field's rule, or where and what."""
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    if loc and loc[0] in FIELD_RULES:
        return f"{loc[0]} {FIELD_RULES[loc[0]]}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {message}" if loc else message


# kind -> its schema: the one table of what each record holds.
RECORD_SCHEMAS: dict[str, type[Signed]] = {
    "record/expert": Expert,
    "record/provider": Provider,
    "record/proposal": Proposal,
    "record/commitment": Commitment,
    "record/attestation": Attestation,
    "record/search": SearchProposal,
    "record/candidates": CandidateList,
    "record/scores": Scores,
    "record/tally": Tally,
    "record/pack": Pack,
    "record/fusion": FusionReport,
    "record/participants": Participants,
    "record/charter": CharterRecord,
}
