"""Merge recipes: parsing and whole-recipe validation before any weight is read.

The dialect is mergekit's (``merge_method``, ``base_model``, ``models[].parameters``,
global ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``) plus hivemerge
extensions: per-layer tables as parameter values (see :mod:`hivemerge.merge.params`)
and ``seed`` for the random masks of DARE. Every problem is reported with its key path,
all of them at once, as one :class:`RecipeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from hivemerge.merge.deltas.delta import DeltaFile, DeltaSource
from hivemerge.merge.io.adapters import ADAPTER_CONFIG, AdapterSource, LoraAdapter, is_adapter
from hivemerge.merge.io.dtypes import dtype_name, parse_dtype
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel, float_dtype
from hivemerge.merge.io.vocab import TOKEN_ROWS, VocabPlan, plan_vocabulary
from hivemerge.merge.layers import count_layers, natural_key
from hivemerge.merge.methods import METHODS, MergeMethod
from hivemerge.merge.slices import Slice, SlicePlan, plan_slices
from hivemerge.merge.params import ParamSpec, resolve_value, validate_value
from hivemerge.protocol.content import ID_PREFIX, parse_content_ref
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.fingerprint import architecture_fingerprint, describe_mismatch

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "seed",
                  "name"}
UNSUPPORTED_KEYS = {
    "modules": "per-module recipes are not supported",
    "tokenizer": "tokenizer merging is not supported; use tokenizer_source",
    "chat_template": "chat_template is not supported; it is copied from tokenizer_source",
}
MODEL_KEYS = {"model", "parameters"}


# What a recipe input reads like: a model directory, or a base plus a delta.
ModelSource = Union[SafetensorsModel, DeltaSource, AdapterSource]


class RecipeError(UserInputError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass
class ModelInput:
    ref: str  # as written in the recipe
    key: str  # its key path, for messages
    source: ModelSource
    params: dict[str, Any] = field(default_factory=dict)
    recipe_index: int = -1  # position in `models` (-1: the base); keys DARE's random streams


@dataclass
class Recipe:
    method: MergeMethod
    base: ModelInput | None
    inputs: list[ModelInput]  # what the method merges, in recipe order
    params: dict[str, Any]
    dtype: torch.dtype
    out_dtype: torch.dtype
    tokenizer_source: ModelInput
    seed: int
    num_layers: int
    document: dict  # the recipe as written, for the model card
    name: str | None = None
    warnings: list[str] = field(default_factory=list)  # shown once, before the merge
    vocab: VocabPlan | None = None  # inputs' token rows lined up (tokenizer_source), when vocabularies differ
    slices: SlicePlan | None = None  # passthrough over mergekit's slices: which source tensor each output tensor is

    @property
    def reference(self) -> ModelInput:
        """The model whose tensor names, shapes and config the output follows."""
        return self.base or self.inputs[0]

    def global_params_for(self, tensor_name: str) -> dict[str, Any]:
        return {s.name: self._resolve(s, [self.params], tensor_name) for s in self.method.global_params}

    def model_params_for(self, model: ModelInput, tensor_name: str) -> dict[str, Any]:
        return {s.name: self._resolve(s, [model.params, self.params], tensor_name) for s in self.method.model_params}

    def _resolve(self, spec: ParamSpec, scopes: list[dict], tensor_name: str) -> Any:
        for scope in scopes:
            if spec.name in scope:
                value = resolve_value(scope[spec.name], tensor_name, self.num_layers)
                if value is not None:
                    return spec.kind(value)
        if spec.required:  # a filter list matched nothing for this tensor
            raise RecipeError([f"parameter {spec.name}: no value applies to tensor {tensor_name}"])
        return spec.default


def read_recipe_document(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserInputError(f"{path}: not valid YAML/JSON{where}: {problem}") from None
    if not isinstance(document, dict):
        raise UserInputError(f"{path}: a recipe must be a mapping of keys (merge_method, models, ...)")
    return document


def load_recipe(path: str | Path, resolver: Resolver | None = None) -> Recipe:
    path = Path(path)
    return validate_recipe(read_recipe_document(path), recipe_dir=path.parent, resolver=resolver)


# Maps a content id to the local file or directory that holds it (a node's content store).
Resolver = Callable[[str], Path]


def resolve_model_path(ref: str, recipe_dir: Path | None) -> Path:
    """A recipe's model reference as a local path: as given (relative to the working
    directory, like mergekit), else relative to the recipe's own folder."""
    candidate = Path(ref).expanduser()
    if candidate.exists() or candidate.is_absolute() or recipe_dir is None:
        return candidate
    beside = recipe_dir / candidate
    return beside if beside.exists() else candidate


def open_input(ref: str, recipe_dir: Path | None, base: "ModelSource | None", resolver: Resolver | None) -> "ModelSource":
    """A model directory, a delta file (applied to ``base``), or ``hm://<id>`` of either."""
    wanted_id = None
    if ref.startswith(ID_PREFIX):
        wanted_id = parse_content_ref(ref)
        if wanted_id is None:
            raise UserInputError(f"{ref}: not a content id (hm:// followed by 64 hex characters)")
        if resolver is None:
            raise UserInputError(f"{ref}: content ids are looked up in a node's store; pass --home")
        path = resolver(wanted_id)
    else:
        path = resolve_model_path(ref, recipe_dir)
        if not path.exists() and "+" in ref:  # mergekit's BASE+ADAPTER
            base_ref, adapter_ref = ref.rsplit("+", 1)
            return _adapted(SafetensorsModel(resolve_model_path(base_ref, recipe_dir)), resolve_model_path(adapter_ref, recipe_dir), ref)
        if path.is_dir() and is_adapter(path):
            named = LoraAdapter(path).base_reference()
            if named is None or not Path(named).is_dir():
                raise UserInputError(f"{ref}: a LoRA adapter whose config names base {named!r}, which is not a local model "
                                     f"directory; write the base before it: BASE+{ref}")
            return _adapted(SafetensorsModel(named), path, ref)
    if path.is_file():
        delta = DeltaFile(path)
        if base is None:
            raise UserInputError(f"{ref}: a delta is applied to base_model, which this recipe lacks or is itself a delta")
        if wanted_id and delta.id != wanted_id:
            raise UserInputError(f"{ref}: the stored delta's id is {delta.id}")
        return DeltaSource(delta, base)
    model = SafetensorsModel(path)
    if wanted_id and model_id(model) != wanted_id:
        raise UserInputError(f"{ref}: the stored model's id is {model_id(model)}")
    return model


def _slices_recipe(document: dict, method: MergeMethod | None, open_model, errors: list[str]) -> Recipe:
    """A frankenmerge: ``slices`` of one source each, ``{model, layer_range: [start, stop]}``, stacked."""
    if method is not None and method.name != "passthrough":
        errors.append(f"slices: hivemerge stacks slices with merge_method passthrough; {method.name} merges whole models "
                      "listed under models")
    for key in ("models", "base_model"):
        if key in document:
            errors.append(f"{key}: not with slices (each slice names its model)")
    raw = document["slices"]
    if not isinstance(raw, list) or not raw:
        errors.append("slices: must be a non-empty list of {sources: [{model: PATH, layer_range: [start, stop]}]}")
        raw = []
    inputs: dict[str, ModelInput] = {}
    slices: list[Slice] = []
    for i, entry in enumerate(raw):
        key = f"slices[{i}]"
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or set(entry) != {"sources"} or not isinstance(sources, list) or len(sources) != 1 \
                or not isinstance(sources[0], dict) or set(sources[0]) != {"model", "layer_range"}:
            errors.append(f"{key}: must be {{sources: [{{model: PATH, layer_range: [start, stop]}}]}} (one source a slice)")
            continue
        ref, span = sources[0]["model"], sources[0]["layer_range"]
        source = open_model(ref, f"{key}.sources[0].model")
        if source is None:
            continue
        layers = count_layers(source.shapes(), source.config())
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1] <= layers):
            errors.append(f"{key}.sources[0].layer_range: must be [start, stop] with 0 <= start < stop <= {layers}, got {span!r}")
            continue
        model = inputs.setdefault(ref, ModelInput(ref, f"{key}.sources[0]", source, {}, len(inputs)))
        slices.append(Slice(model.recipe_index, f"{key}.sources[0]", source.shapes(), span[0], span[1]))
    plan = None
    if not errors:
        try:
            plan = plan_slices(slices)
        except UserInputError as exc:
            errors.append(str(exc))
    models = list(inputs.values())
    dtype = _dtype_field(document, "dtype", "float32", errors)
    inputs_dtype = float_dtype(models[0].source) if models else None
    out_dtype = _dtype_field(document, "out_dtype", document.get("dtype") or dtype_name(inputs_dtype or torch.float32), errors)
    for key in ("parameters", "tokenizer_source"):
        if document.get(key):
            errors.append(f"{key}: not with slices (passthrough takes no parameters; the tokenizer is the first slice's model's)")
    if errors:
        raise RecipeError(errors)
    return Recipe(method=METHODS["passthrough"], base=None, inputs=models, params={}, dtype=dtype, out_dtype=out_dtype,
                  tokenizer_source=models[0], seed=0, num_layers=plan.num_layers, document=document,
                  name=document.get("name") if isinstance(document.get("name"), str) else None, slices=plan)


def _vocab_free(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes with the token dimension of embeddings and LM heads left out (vocabularies
    are lined up by tokenizer_source; the rest of the architecture must match)."""
    return {n: (0, *s[1:]) if TOKEN_ROWS.fullmatch(n) and len(s) == 2 else s for n, s in shapes.items()}


def _adapted(base: SafetensorsModel, adapter_dir: Path, ref: str) -> AdapterSource:
    if not is_adapter(adapter_dir):
        raise UserInputError(f"{ref}: {adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    return AdapterSource(base, LoraAdapter(adapter_dir))


def validate_recipe(document: dict, recipe_dir: Path | None = None, resolver: Resolver | None = None) -> Recipe:
    errors: list[str] = []
    warnings: list[str] = []
    opened: dict[str, ModelSource] = {}
    base: ModelInput | None = None

    def open_model(ref: Any, key: str) -> ModelSource | None:
        if not isinstance(ref, str) or not ref:
            errors.append(f"{key}: must be a model directory, a delta file or hm://<id>, got {ref!r}")
            return None
        if ref not in opened:
            try:
                base_source = base.source if base is not None and isinstance(base.source, SafetensorsModel) else None
                opened[ref] = open_input(ref, recipe_dir, base_source, resolver)
            except UserInputError as exc:
                errors.append(f"{key}: {exc}")
                return None
        return opened[ref]

    for key in document:
        if key in UNSUPPORTED_KEYS:
            errors.append(f"{key}: {UNSUPPORTED_KEYS[key]}")
        elif key not in TOP_LEVEL_KEYS:
            errors.append(f"{key}: unknown key; expected one of {sorted(TOP_LEVEL_KEYS)}")

    method_name = document.get("merge_method")
    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    if method_name is None:
        errors.append(f"merge_method: required; one of {sorted(METHODS)}")
    elif method is None:
        errors.append(f"merge_method: unknown method {method_name!r}; expected one of {sorted(METHODS)}")

    if "slices" in document:
        return _slices_recipe(document, method, open_model, errors)

    if document.get("base_model") is not None:
        source = open_model(document["base_model"], "base_model")
        if source is not None:
            base = ModelInput(document["base_model"], "base_model", source)
    elif method is not None and method.requires_base:
        errors.append(f"base_model: required by {method.name}")

    models: list[ModelInput] = []
    raw_models = document.get("models")
    if raw_models is None:
        errors.append("models: required; a list of {model: PATH, parameters: {...}}")
        raw_models = []
    elif not isinstance(raw_models, list) or not raw_models:
        errors.append("models: must be a non-empty list of {model: PATH, parameters: {...}}")
        raw_models = []
    for i, entry in enumerate(raw_models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            errors.append(f"{key}: must be a mapping {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            continue
        for unknown in sorted(set(entry) - MODEL_KEYS):
            errors.append(f"{key}.{unknown}: unknown key; expected model and parameters")
        if "model" not in entry:
            errors.append(f"{key}.model: required")
            continue
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            errors.append(f"{key}.parameters: must be a mapping, got {params!r}")
            params = {}
        source = open_model(entry["model"], f"{key}.model")
        if source is not None:
            models.append(ModelInput(entry["model"], key, source, params, i))

    # Homogeneity: every input must have the reference's tensor names and shapes.
    reference = base or (models[0] if models else None)
    num_layers = -1
    if reference is not None:
        ref_shapes = reference.source.shapes()
        ref_print = architecture_fingerprint(_vocab_free(ref_shapes))
        for m in models:
            if m.source is reference.source or architecture_fingerprint(m.source.shapes()) == architecture_fingerprint(ref_shapes):
                continue
            if architecture_fingerprint(_vocab_free(m.source.shapes())) != ref_print:
                errors.append(
                    f"{m.key}.model: architecture differs from {reference.key} "
                    f"({describe_mismatch(ref_shapes, m.source.shapes())}); heterogeneous experts go through `hivemerge fuse`"
                )
            elif "tokenizer_source" not in document:  # the same model, another vocabulary (added tokens)
                errors.append(
                    f"{m.key}.model: its vocabulary differs from {reference.key}'s ({describe_mismatch(ref_shapes, m.source.shapes())}); "
                    "set tokenizer_source: union (every model's tokens, new rows from the models that have them) or base "
                    "(the base's tokens only)"
                )
        if not errors:
            num_layers = count_layers(ref_shapes, reference.source.config())

    inputs = models
    if method is not None:
        if method.drops_base_from_models and base is not None:
            inputs = [m for m in models if m.source is not base.source]
        count = len(inputs)
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            want = (
                f"exactly {method.min_models}" if method.min_models == method.max_models
                else f"at least {method.min_models}" if method.max_models is None
                else f"{method.min_models} to {method.max_models}"
            )
            extra = " besides base_model" if method.drops_base_from_models else ""
            errors.append(f"models: {method.name} merges {want} model(s){extra}, got {count}")
        ignored = validate_params(method, document.get("parameters"), models, base, num_layers, errors)
        if ignored:
            warnings.append(f"{', '.join(sorted(ignored))}: no effect on {method.name} (accepted, as mergekit accepts it)")
        if not errors and reference is not None:
            _check_coverage(method, document.get("parameters") or {}, models, base, reference, num_layers, errors)

    # The math runs in float32 unless ``dtype`` says otherwise; the output keeps the
    # inputs' dtype (bf16 in, bf16 out, as mergekit writes it) unless a dtype is named.
    dtype = _dtype_field(document, "dtype", "float32", errors)
    inputs_dtype = float_dtype(reference.source) if reference is not None else None
    out_dtype = _dtype_field(document, "out_dtype", document.get("dtype") or dtype_name(inputs_dtype or torch.float32), errors)

    tokenizer_source = reference
    tok = document.get("tokenizer_source", "base")
    if isinstance(tok, str) and tok.startswith("model:"):
        tok = tok.removeprefix("model:")
    vocab_mode = "base"
    if tok == "base":
        if base is not None:
            tokenizer_source = base
    elif tok == "union":
        vocab_mode = "union"
    elif isinstance(tok, str) and any(m.ref == tok for m in models):
        tokenizer_source, vocab_mode = next(m for m in models if m.ref == tok), "model"
    else:
        errors.append(f"tokenizer_source: must be 'base', 'union' or one of the recipe's models, got {tok!r}")
    vocab = None
    everyone = [m for m in models if reference is not None and m.source is not reference.source]
    if not errors and any(m.source.shapes() != reference.source.shapes() for m in everyone):  # the token rows differ
        try:
            vocab = plan_vocabulary(vocab_mode, reference, models, tokenizer_source)  # every model: the base listed among them too
        except UserInputError as exc:
            errors.append(f"tokenizer_source: {exc}")

    seed = document.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        errors.append(f"seed: must be a non-negative integer, got {seed!r}")

    name = document.get("name")
    if name is not None and not isinstance(name, str):
        errors.append(f"name: must be a string, got {name!r}")

    if errors:
        raise RecipeError(errors)
    return Recipe(
        method=method,
        base=base,
        inputs=inputs,
        params=dict(document.get("parameters") or {}),
        dtype=dtype,
        out_dtype=out_dtype,
        tokenizer_source=tokenizer_source,
        seed=seed,
        num_layers=num_layers,
        document=document,
        name=name,
        warnings=warnings,
        vocab=vocab,
    )


def validate_params(
    method: MergeMethod, global_params: Any, models: list[ModelInput], base: ModelInput | None, num_layers: int, errors: list[str]
) -> set[str]:
    """Append each problem to ``errors``; return the names of the ignored parameters set
    (:attr:`ParamSpec.ignored`)."""
    ignored: set[str] = set()
    if global_params is None:
        global_params = {}
    if not isinstance(global_params, dict):
        errors.append(f"parameters: must be a mapping, got {global_params!r}")
        global_params = {}
    # Per-model parameters may also be given globally, as defaults for every model.
    global_allowed = {s.name: s for s in method.global_params + method.model_params}
    for name, value in global_params.items():
        spec = global_allowed.get(name)
        if spec is None:
            errors.append(f"parameters.{name}: unknown parameter for {method.name}; expected one of {sorted(global_allowed) or 'none'}")
        else:
            validate_value(spec, value, f"parameters.{name}", num_layers, errors)
            if spec.ignored:
                ignored.add(name)
    for spec in method.global_params:
        if spec.required and spec.name not in global_params:
            errors.append(f"parameters.{spec.name}: required by {method.name}")
    model_allowed = {s.name: s for s in method.model_params}
    for m in models:
        for name, value in m.params.items():
            spec = model_allowed.get(name)
            if spec is None:
                errors.append(
                    f"{m.key}.parameters.{name}: unknown parameter for {method.name}; "
                    f"expected one of {sorted(model_allowed) or 'none'}"
                )
            else:
                validate_value(spec, value, f"{m.key}.parameters.{name}", num_layers, errors)
                if spec.ignored:
                    ignored.add(name)
        for spec in method.model_params:
            if spec.required and spec.name not in m.params and spec.name not in global_params:
                if method.drops_base_from_models and base is not None and m.source is base.source:
                    continue  # the base listed among the models contributes no task vector
                errors.append(f"{m.key}.parameters.{spec.name}: required by {method.name}")
    return ignored


def _check_coverage(
    method: MergeMethod, global_params: dict, models: list[ModelInput], base: ModelInput | None,
    reference: ModelInput, num_layers: int, errors: list[str],
) -> None:
    """A required parameter given as filter lists must have a value for every merged tensor.

    Checked here, from the tensor names in the headers, so that the problem is reported
    with its key path before any weight is read rather than in the middle of the merge.
    """
    names = sorted(
        (n for n, info in reference.source.tensors.items() if info.dtype.is_floating_point), key=natural_key
    )

    def first_uncovered(values: list) -> str | None:
        for tensor in names:
            if all(resolve_value(v, tensor, num_layers) is None for v in values):
                return tensor
        return None

    def report(path: str, tensor: str) -> None:
        errors.append(f"{path}: no value applies to tensor {tensor}; add an entry without filter")

    for spec in method.global_params:
        if spec.required and spec.name in global_params:
            tensor = first_uncovered([global_params[spec.name]])
            if tensor is not None:
                report(f"parameters.{spec.name}", tensor)
    for spec in method.model_params:
        if not spec.required:
            continue
        for m in models:
            if method.drops_base_from_models and base is not None and m.source is base.source:
                continue
            scopes = [scope[spec.name] for scope in (m.params, global_params) if spec.name in scope]
            tensor = first_uncovered(scopes) if scopes else None
            if tensor is not None:
                where = f"{m.key}.parameters.{spec.name}" if spec.name in m.params else f"parameters.{spec.name}"
                report(where, tensor)


def _dtype_field(document: dict, key: str, default: str, errors: list[str]) -> torch.dtype:
    try:
        return parse_dtype(document.get(key) or default, key)
    except UserInputError as exc:
        errors.append(str(exc))
        return torch.float32
