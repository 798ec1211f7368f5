"""Vocabularies of merge inputs: experts that added tokens (chat fine-tunes) merged
token by token, as mergekit's ``tokenizer_source`` does.

A recipe's ``tokenizer_source`` picks the output vocabulary: ``base`` (the base's
tokens), ``union`` (the base's, then every model's added tokens in recipe order) or
``model:REF`` (that model's). Each input's embedding and LM-head rows are lined up by
token: rows of tokens every input has are merged by the method; a token only some
inputs have takes the mean of their rows (exactly the row of the one model that has it).

Supported: vocabularies that extend the reference's (base, else the first model) --
the same tokens at the same ids, then added tokens -- read from ``tokenizer.json``, with
one embedding row per token. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from hivemerge.protocol.errors import UserInputError

# Tensors whose rows are tokens (mergekit names them in its architecture files).
TOKEN_ROWS = re.compile(r"(^|.*\.)(embed_tokens|wte|embed_in|word_embeddings|tok_embeddings|lm_head|embed_out|output)\.weight")
_MAX_TOKENIZER_BYTES = 64 << 20


def token_row_tensors(shapes: dict[str, tuple[int, ...]], vocab_size: int) -> set[str]:
    """The tensors whose first dimension is the vocabulary (an embedding or an LM head)."""
    return {n for n, s in shapes.items() if TOKEN_ROWS.fullmatch(n) and len(s) == 2 and s[0] == vocab_size}


@dataclass
class Vocabulary:
    """A tokenizer.json's tokens by id, and its added-token entries by id."""

    tokens: list[str]
    added: dict[int, dict] = field(default_factory=dict)
    document: dict = field(default_factory=dict)

    @classmethod
    def read(cls, source, where: str) -> Vocabulary | None:
        raw = source.read_file("tokenizer.json")
        if raw is None:
            return None
        if len(raw) > _MAX_TOKENIZER_BYTES:
            raise UserInputError(f"{where}: tokenizer.json is larger than {_MAX_TOKENIZER_BYTES >> 20} MB")
        try:
            document = json.loads(raw)
            vocab = document["model"]["vocab"]
            pairs = vocab.items() if isinstance(vocab, dict) else ((entry[0], i) for i, entry in enumerate(vocab))  # Unigram: a list
            by_id = {int(i): str(t) for t, i in pairs}
            added = {int(e["id"]): e for e in document.get("added_tokens", [])}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise UserInputError(f"{where}: tokenizer.json has no readable vocabulary ({exc})") from None
        for i, entry in added.items():
            by_id[i] = str(entry.get("content"))
        size = max(by_id, default=-1) + 1
        if sorted(by_id) != list(range(size)):
            raise UserInputError(f"{where}: tokenizer.json's ids are not 0..{size - 1} without gaps")
        return cls([by_id[i] for i in range(size)], added, document)


@dataclass
class VocabPlan:
    """The output's tokens, and for each input (by recipe index; -1 is the base) the row
    of each output token in that input (-1: it lacks the token)."""

    tokens: list[str]
    rows: dict[int, list[int]]
    tensors: set[str]  # the tensors with a row per token
    tokenizer: dict | None  # the output's tokenizer.json (None: tokenizer_source's own)
    added: list[int]  # output ids of the tokens that are not the reference's

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (len(self.tokens), *shape[1:]) if name in self.tensors else shape


def plan_vocabulary(mode: str, reference, inputs: list, chosen=None) -> VocabPlan | None:
    """The plan for ``tokenizer_source`` ``mode`` (base, union or model) over ``reference``
    (a ModelInput: the base, else the first model) and ``inputs`` (every ModelInput),
    or None when every input has the reference's vocabulary (nothing to line up)."""
    vocabs = {}
    for m in [reference, *inputs]:
        vocab = Vocabulary.read(m.source, m.key)
        if vocab is None:
            raise UserInputError(f"{m.key}: no tokenizer.json: tokenizer_source {mode} lines up embeddings by token")
        vocabs[m.recipe_index] = vocab
    ref = vocabs[reference.recipe_index]
    tensors = token_row_tensors(reference.source.shapes(), len(ref.tokens))
    for m in inputs:
        tokens = vocabs[m.recipe_index].tokens
        common = min(len(tokens), len(ref.tokens))
        bad = next((i for i in range(common) if tokens[i] != ref.tokens[i]), None)
        if bad is not None or len(tokens) < len(ref.tokens):
            where = f"token {bad} is {tokens[bad]!r} there, {ref.tokens[bad]!r} in {reference.key}" if bad is not None else \
                f"{len(tokens)} tokens, fewer than {reference.key}'s {len(ref.tokens)}"
            raise UserInputError(f"{m.key}: its vocabulary does not extend {reference.key}'s ({where}); hivemerge lines up "
                                 "vocabularies that keep the base's tokens and add new ones after them")
        rows = m.source.shapes()
        for name in tensors:
            if rows.get(name, (None,))[0] != len(tokens):
                raise UserInputError(f"{m.key}: {name} has {rows.get(name, (0,))[0]} rows for {len(tokens)} tokens; "
                                     "a row per token is needed to line them up")
    if all(len(vocabs[m.recipe_index].tokens) == len(ref.tokens) for m in inputs):
        return None  # prefixes of one another, of one length: the same vocabulary
    if not tensors:
        raise UserInputError(f"{reference.key}: no embedding or LM head has one row per token ({len(ref.tokens)} tokens; "
                             "a padded vocabulary?): hivemerge lines up vocabularies with a row per token")
    if mode == "base":
        target = list(ref.tokens)
    elif mode == "union":
        target, seen = list(ref.tokens), set(ref.tokens)
        for m in inputs:
            for token in vocabs[m.recipe_index].tokens[len(ref.tokens):]:
                if token not in seen:
                    seen.add(token)
                    target.append(token)
    else:
        target = list(vocabs[chosen.recipe_index].tokens)
    rows = {}
    for index, vocab in vocabs.items():
        # the reference's tokens are at their own ids in every input (checked above); an added
        # token is found among the input's added ids, by its first occurrence
        added_at: dict[str, int] = {}
        for i in range(len(ref.tokens), len(vocab.tokens)):
            added_at.setdefault(vocab.tokens[i], i)
        rows[index] = [k if k < len(ref.tokens) else added_at.get(t, -1) for k, t in enumerate(target)]
    added = list(range(len(ref.tokens), len(target)))
    # base and model: that tokenizer_source's own files are the output's; union: the reference's plus the added tokens
    tokenizer = _tokenizer(ref, vocabs, [m.recipe_index for m in inputs], target) if mode == "union" else None
    return VocabPlan(target, rows, tensors, tokenizer, added)


def _tokenizer(ref: Vocabulary, vocabs: dict[int, Vocabulary], order: list[int], target: list[str]) -> dict:
    """The reference's tokenizer.json with the target's tokens beyond it as added tokens
    (each with the entry of the first model that added it)."""
    document = json.loads(json.dumps(ref.document))
    entries = [e for e in document.get("added_tokens", []) if int(e["id"]) < len(target) and target[int(e["id"])] == e["content"]]
    for new_id in range(len(ref.tokens), len(target)):
        token = target[new_id]
        entry = next((dict(vocabs[i].added[j]) for i in order for j, t in enumerate(vocabs[i].tokens)
                      if t == token and j in vocabs[i].added), None)
        entry = entry or {"content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
                          "special": False}
        entries.append({**entry, "id": new_id})
    document["added_tokens"] = sorted(entries, key=lambda e: e["id"])
    return document
