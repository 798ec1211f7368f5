"""Bad recipes through the real command line.

The contract (DESIGN.md): exit status 2, exactly one line on stderr that starts with
``error: `` and names the key path, no traceback, nothing on stdout, and no output
directory. The whole recipe is checked before any weight is read.

Every case runs the console script's ``main()`` in a process of its own, forked from
one interpreter that imported the CLI once (delta_fixtures.CliRunner: a fresh
``python -m hivemerge`` spends ~2 s of CPU importing torch). The kinds in FRESH also
run as ``python -m hivemerge`` and must give the same result.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import run_cli_many, write_recipe, write_tensors
from delta_fixtures import shared_runner
from safetensors.torch import load_file


def good(f) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(f["base"]),
        "models": [
            {"model": str(f["math"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(f["code"]), "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "dtype": "float32",
    }


def edit(fn):
    """A case: a function of (family, extra dirs) that returns a broken copy of ``good``."""

    def make(f, extra):
        doc = copy.deepcopy(good(f))
        fn(doc, f, extra)
        return doc

    return make


CASES = {
    "unknown_method": (
        edit(lambda d, f, x: d.update(merge_method="tie")),
        ["merge_method: unknown method 'tie'", "ties"],
    ),
    "missing_method": (
        edit(lambda d, f, x: d.pop("merge_method")),
        ["merge_method: required"],
    ),
    "unknown_top_level_key": (
        edit(lambda d, f, x: d.update(merge_methods="ties")),
        ["merge_methods: unknown key"],
    ),
    "model_path_missing": (
        edit(lambda d, f, x: d["models"][1].update(model=str(x["root"] / "no-such-model"))),
        ["models[1].model: ", "no-such-model: no such model directory"],
    ),
    "ties_without_base": (
        edit(lambda d, f, x: d.pop("base_model")),
        ["base_model: required by ties"],
    ),
    "unknown_parameter": (
        edit(lambda d, f, x: d["models"][1]["parameters"].update(densty=0.5)),
        ["models[1].parameters.densty: unknown parameter for ties"],
    ),
    "unknown_global_parameter": (
        edit(lambda d, f, x: d.update(parameters={"lamda": 1.0})),
        ["parameters.lamda: unknown parameter for ties"],
    ),
    "string_weight": (
        edit(lambda d, f, x: d["models"][0]["parameters"].update(weight="heavy")),
        ["models[0].parameters.weight: must be a number, got 'heavy'"],
    ),
    "density_out_of_range": (
        edit(lambda d, f, x: d["models"][1]["parameters"].update(density=1.5)),
        ["models[1].parameters.density: must be in (0, 1], got 1.5"],
    ),
    "missing_weight": (
        edit(lambda d, f, x: d["models"][1]["parameters"].pop("weight")),
        ["models[1].parameters.weight: required by ties"],
    ),
    "per_layer_wrong_length": (
        edit(lambda d, f, x: d["models"][0]["parameters"].update(density={"per_layer": [0.5, 0.6, 0.7], "default": 0.5})),
        ["models[0].parameters.density.per_layer: expected 2 values (one per layer), got 3 values"],
    ),
    "architecture_differs": (
        edit(lambda d, f, x: d["models"][1].update(model=str(x["reshaped"]))),
        ["models[1].model: architecture differs from base_model", "model.norm.weight has shape [16], expected [32]"],
    ),
    "unknown_dtype": (
        edit(lambda d, f, x: d.update(dtype="float8")),
        ["dtype: unknown dtype 'float8'"],
    ),
    "slerp_two_models": (
        edit(lambda d, f, x: d.update(merge_method="slerp", parameters={"t": 0.5}, models=[{"model": str(f["math"])}, {"model": str(f["code"])}])),
        ["models: slerp merges exactly 1 model(s) besides base_model, got 2"],
    ),
    "slerp_without_t": (
        edit(lambda d, f, x: d.update(merge_method="slerp", models=[{"model": str(f["math"])}])),
        ["parameters.t: required by slerp"],
    ),
    "bad_tokenizer_source": (
        edit(lambda d, f, x: d.update(tokenizer_source="intersection")),
        ["tokenizer_source: must be 'base', 'union' or one of the recipe's models, got 'intersection'"],
    ),
    "filter_without_value": (
        edit(lambda d, f, x: d["models"][0]["parameters"].update(weight=[{"filter": "mlp"}, {"value": 1.0}])),
        ["models[0].parameters.weight[0].value: required"],
    ),
    "filters_leave_tensors_without_weight": (
        edit(lambda d, f, x: d["models"][0]["parameters"].update(weight=[{"filter": "mlp", "value": 1.0}])),
        ["models[0].parameters.weight: no value applies to tensor lm_head.weight"],
    ),
    "slices": (
        edit(lambda d, f, x: d.update(slices=[{"sources": [{"model": str(f["math"]), "layer_range": [0, 2]}]}])),
        ["slices: hivemerge stacks slices with merge_method passthrough; ties merges whole models", "models: not with slices"],
    ),
    "two_problems_at_once": (
        edit(lambda d, f, x: (d["models"][1]["parameters"].update(density=1.5), d.update(out_dtype="int3"))),
        ["models[1].parameters.density: must be in (0, 1], got 1.5", "out_dtype: unknown dtype 'int3'"],
    ),
    "yaml_syntax": ("merge_method: ties\nmodels: [\n  {model: a,\n", ["not valid YAML/JSON at line", ".yaml"]),
    "not_a_mapping": ("- merge_method\n- ties\n", ["a recipe must be a mapping"]),
    "output_not_empty": (edit(lambda d, f, x: None), ["directory exists and is not empty", "--overwrite"]),
    "device_cuda_without_gpu": (edit(lambda d, f, x: None), ["--device cuda: no CUDA device is available"]),
}


FRESH = {"unknown_method", "density_out_of_range"}


@pytest.fixture(scope="session")
def error_setup(tiny_family, tmp_path_factory):
    """Every case's recipe file, output path and argv (outputs under a folder per case)."""
    root = tmp_path_factory.mktemp("bad-recipes")
    # A model like the family but with one tensor of another shape.
    tensors = load_file(str(tiny_family["base"] / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(16)
    extra = {"root": root, "reshaped": write_tensors(root / "reshaped", tensors)}
    argvs, outs = {}, {}
    for name, (make, _) in CASES.items():
        recipe = root / f"{name}.yaml"
        if isinstance(make, str):
            recipe.write_text(make)
        else:
            write_recipe(recipe, make(tiny_family, extra))
        outs[name] = root / "outputs" / name / "merged"
        argv = ["merge", str(recipe), "--out", str(outs[name]), "--device", "cpu"]
        if name == "output_not_empty":
            outs[name].mkdir(parents=True)
            (outs[name] / "keep.txt").write_text("precious")
        if name == "device_cuda_without_gpu":
            argv[-1] = "cuda"
        argvs[name] = argv
    return argvs, outs


@pytest.fixture(scope="session")
def error_runs(error_setup, tmp_path_factory):
    argvs, _ = error_setup
    runner = shared_runner(tmp_path_factory)
    forked = {name: runner(*argv) for name, argv in argvs.items()}
    fresh = run_cli_many({name: argvs[name] for name in FRESH})
    return forked, fresh


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe(error_setup, error_runs, case):
    if case == "device_cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, outs = error_setup
    result = error_runs[0][case]
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in CASES[case][1]:
        assert fragment in lines[0], lines[0]
    out: Path = outs[case]
    if case == "output_not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.parent.exists()  # not even the parent folder: nothing was written
    if out.parent.exists():  # no staging folder left behind either
        assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("case", sorted(FRESH))
def test_fresh_process_gives_the_same_error(error_runs, case):
    forked, fresh = error_runs
    proc = fresh[case]
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", forked[case].stderr)


def test_good_recipe_passes(tiny_family, tmp_path):
    """The recipe every case breaks is itself valid (so each case fails for its own reason)."""
    from hivemerge.merge.recipe import validate_recipe

    recipe = validate_recipe(good(tiny_family))
    assert recipe.method.name == "ties" and [m.key for m in recipe.inputs] == ["models[0]", "models[1]"]
    assert recipe.num_layers == 2


@pytest.mark.parametrize("argv, message", [
    (["merge"], "Missing argument 'recipe'."),
    (["merge", "r.yaml", "--bogus"], "No such option: --bogus"),
    (["fuse", "--pivot", "x"], "Missing option '--packs' / '--pack'."),
    (["eval", "model", "--count", "many"], "Invalid value for '--count'"),
])
def test_a_usage_error_is_a_message_and_exit_2_not_a_traceback(tmp_path_factory, argv, message):
    """Usage errors raised by typer's own vendored click (typer >= 0.2x) as well as click's."""
    result = shared_runner(tmp_path_factory)(*argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"Error: {message}" in result.stderr, result.stderr
    assert "Usage: hivemerge " + argv[0] in result.stderr
