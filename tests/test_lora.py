"""PEFT LoRA adapters as merge inputs (``BASE+ADAPTER``, or an adapter whose config names
its base): equal to PEFT's own ``merge_and_unload``; what is not a plain safetensors
LoRA adapter is refused with the reason."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import merge_doc, run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=64, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "base"
    LlamaForCausalLM(LLAMA).save_pretrained(path)
    return path


def make_adapter(model_class, base: Path, out: Path, perturb_saved: bool = False, **config) -> dict[str, torch.Tensor]:
    """A PEFT adapter with random A and B (PEFT's default B = 0 would change nothing),
    saved as safetensors; returns PEFT's own merge of it into the base."""
    torch.manual_seed(1)
    model = get_peft_model(model_class.from_pretrained(base), LoraConfig(init_lora_weights=False, **config))
    if perturb_saved:  # a fine-tuned modules_to_save copy: it replaces the base's tensor
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.25)
    model.save_pretrained(out)
    return PeftModel.from_pretrained(model_class.from_pretrained(base), out).merge_and_unload().state_dict()


def assert_equals_peft(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: Path, changed: set[str]):
    base_state = LlamaForCausalLM.from_pretrained(base).state_dict() if "llama" in str(base) else None
    assert set(got) == set(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-6, msg=name)
    if base_state is not None:  # the adapter did change these, and only these
        assert {n for n in got if not torch.equal(want[n], base_state[n])} == changed


def test_base_plus_adapter_equals_peft_merge_and_unload(llama_base, tmp_path):
    want = make_adapter(LlamaForCausalLM, llama_base, tmp_path / "adapter", perturb_saved=True, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"])
    got = merge_doc({"merge_method": "linear", "parameters": {"weight": 1.0},
                     "models": [{"model": f"{llama_base}+{tmp_path / 'adapter'}"}]}, tmp_path / "out")
    changed = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert_equals_peft(got, want, llama_base, changed | {"model.embed_tokens.weight", "lm_head.weight"})


def test_rslora_and_per_module_rank_and_alpha(llama_base, tmp_path):
    want = make_adapter(LlamaForCausalLM, llama_base, tmp_path / "adapter", r=4, lora_alpha=16, use_rslora=True,
                        target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 3})
    got = merge_doc({"merge_method": "linear", "parameters": {"weight": 1.0},
                     "models": [{"model": f"{llama_base}+{tmp_path / 'adapter'}"}]}, tmp_path / "out")
    assert_equals_peft(got, want, llama_base, {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "o_proj")})


def test_fan_in_fan_out_layers(tmp_path):
    """GPT-2's Conv1D stores (in, out): PEFT's fan_in_fan_out transposes B A."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "base")
    want = make_adapter(GPT2LMHeadModel, tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8,
                        target_modules=["c_attn"], fan_in_fan_out=True)
    got = merge_doc({"merge_method": "linear", "parameters": {"weight": 1.0},
                     "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'adapter'}"}]}, tmp_path / "out")
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(got["transformer.h.0.attn.c_attn.weight"],
                           GPT2LMHeadModel.from_pretrained(tmp_path / "base").state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_an_adapter_that_names_its_base_and_a_task_arithmetic_of_two(llama_base, tmp_path):
    """An adapter directory alone, its config naming the local base; two adapters merged by
    task arithmetic give the base plus the sum of their deltas."""
    first = make_adapter(LlamaForCausalLM, llama_base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    second = make_adapter(LlamaForCausalLM, llama_base, tmp_path / "b", r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_base)
    got = merge_doc({"merge_method": "task_arithmetic", "base_model": str(llama_base), "dtype": "float32",
                     "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}},
                                {"model": f"{llama_base}+{tmp_path / 'b'}", "parameters": {"weight": 1.0}}]}, tmp_path / "out")
    base = LlamaForCausalLM.from_pretrained(llama_base).state_dict()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, base[name] + (first[name] - base[name]) + (second[name] - base[name]),
                                   rtol=1e-6, atol=1e-6, msg=name)


def refused(tmp_path, ref: str) -> str:
    (tmp_path / "r.json").write_text(json.dumps({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": ref}]}))
    proc = run_cli("merge", tmp_path / "r.json", "--out", tmp_path / "out")
    assert proc.returncode == 2 and not (tmp_path / "out").exists(), proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    return line


def test_what_is_not_a_plain_safetensors_lora_adapter_is_refused(llama_base, tmp_path):
    make_adapter(LlamaForCausalLM, llama_base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    assert "a DoRA adapter" in refused(tmp_path, f"{llama_base}+{tmp_path / 'dora'}")
    make_adapter(LlamaForCausalLM, llama_base, tmp_path / "pickled", r=2, lora_alpha=4, target_modules=["q_proj"])
    (tmp_path / "pickled" / "adapter_model.safetensors").rename(tmp_path / "pickled" / "adapter_model.bin")
    assert "is a pickle, which hivemerge never loads" in refused(tmp_path, f"{llama_base}+{tmp_path / 'pickled'}")
    make_adapter(LlamaForCausalLM, llama_base, tmp_path / "hub", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-2-7b"}))
    assert "write the base before it: BASE+" in refused(tmp_path, str(tmp_path / "hub"))
    # an adapter made for another architecture: its factors do not fit the base's tensors
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    (tmp_path / "hub" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    assert "rank 2 in the weights, r=3" in refused(tmp_path, f"{llama_base}+{tmp_path / 'hub'}")


# -- an adapter as a signed low-rank delta -------------------------------------------------

def test_an_adapter_is_extracted_as_its_factors_and_rebuilds_the_merged_expert_exactly(llama_base, tmp_path):
    from delta_fixtures import load_dir_tensors

    from hivemerge.merge.deltas.delta import DeltaFile, apply_delta, extract_delta
    from hivemerge.protocol.identity import Identity

    make_adapter(LlamaForCausalLM, llama_base, tmp_path / "adapter", perturb_saved=True, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    report = extract_delta(llama_base, tmp_path / "adapter", tmp_path / "d.delta.safetensors", Identity.generate())
    # q, v (2 layers) and the embeddings as factors; lm_head (modules_to_save) exact; the rest unchanged
    assert report.codecs == {"lowrank": 5, "same": 15, "lossless": 1}
    delta = DeltaFile(tmp_path / "d.delta.safetensors")
    parts = delta.manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]["parts"]
    assert (parts["a"]["shape"], parts["b"]["shape"]) == ([4, 32], [32, 4])
    assert delta.manifest["tensors"]["model.embed_tokens.weight"]["params"]["transposed"] is True
    rebuilt = apply_delta(llama_base, tmp_path / "d.delta.safetensors", tmp_path / "rebuilt")
    assert rebuilt["exact"] and rebuilt["rebuilt_id"] == report.expert_id
    via_adapter = merge_doc({"merge_method": "linear", "parameters": {"weight": 1.0},
                             "models": [{"model": f"{llama_base}+{tmp_path / 'adapter'}"}]}, tmp_path / "a")
    assert all(torch.equal(t, via_adapter[n]) for n, t in load_dir_tensors(tmp_path / "rebuilt").items())


def test_lowrank_codec_is_a_truncated_svd(tmp_path):
    """rank 3 of a rank-3 delta gives it back (to float32 rounding); rank 2 leaves the
    smallest singular value as the Frobenius error (Eckart-Young)."""
    from hivemerge.merge.deltas.codecs import parse_codec

    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 24, generator=g)
    delta = (torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)) * 0.01
    sigma = torch.linalg.svdvals(delta.double())
    for spec, error in (("lowrank:rank=3", 0.0), ("lowrank:rank=2", float(sigma[2])), ("lowrank:rank=3,transposed=true", 0.0)):
        codec, opts = parse_codec(spec)
        parts = codec.encode("w", base, base + delta, opts)
        got = codec.decode(base, parts, torch.float32, (40, 24), opts)
        assert abs(float(torch.linalg.norm((got - base - delta).double())) - error) < 1e-5, spec


@pytest.mark.parametrize("change, message", [
    (lambda p, o: {**p, "b": p["b"][:-1]}, "part b has 117 entries"),
    (lambda p, o: {**p, "a": torch.cat([p["a"], p["a"][:1]])}, "part a has 96 entries, 72 expected"),
    (lambda p, o: {**p, "a": p["a"].clone().index_fill_(0, torch.tensor([0]), float("nan"))}, "holds NaN or Inf"),
])
def test_a_lowrank_delta_of_the_wrong_size_or_values_is_refused(change, message):
    from hivemerge.merge.deltas.codecs import parse_codec
    from hivemerge.protocol.errors import UserInputError

    codec, opts = parse_codec("lowrank:rank=3")
    base = torch.zeros(40, 24)
    parts = codec.encode("w", base, base + torch.randn(40, 3) @ torch.randn(3, 24), opts)
    with pytest.raises(UserInputError, match=message):
        codec.decode(base, change(parts, opts), torch.float32, (40, 24), opts)


def test_a_lowrank_rank_above_the_cap_is_refused():
    """A decode costs rank passes: a delta cannot make every peer compute without bound."""
    from hivemerge.merge.deltas.codecs import CODECS, MAX_RANK, check_options
    from hivemerge.protocol.errors import UserInputError

    with pytest.raises(UserInputError, match=re.escape(f"rank: must be in [1, {MAX_RANK}]")):
        check_options(CODECS["lowrank"], {"rank": MAX_RANK + 1}, "t")


def test_a_lowrank_deltas_screening_norm_comes_from_its_factors():
    """Screening reads no base and decodes nothing: ||scale B A||^2 from the r x r Gram
    matrices equals the sum of the squares of the product (float64, by matmul here)."""
    from hivemerge.merge.deltas.codecs import parse_codec

    g = torch.Generator().manual_seed(3)
    for spec in ("lowrank:rank=5,scale=0.5", "lowrank:rank=5,scale=2,transposed=true"):
        codec, opts = parse_codec(spec)
        b, a = torch.randn(30, 5, generator=g), torch.randn(5, 20, generator=g)
        product = opts["scale"] * (b.double() @ a.double())
        shape = (20, 30) if opts["transposed"] else (30, 20)
        got = codec.squares({"a": a, "b": b}, shape, opts)
        assert abs(got - float(product.square().sum())) <= 1e-12 * got


def test_hostile_lowrank_options_and_factor_dtypes_are_refused():
    """A peer's lowrank delta: a scale whose square overflows, float64 factors (whose
    products are no longer exact in float64) and a float where an integer option goes are
    refused as the delta's fault (UserInputError -> DeltaError), never a crash."""
    from hivemerge.merge.deltas.codecs import CODECS, MAX_SCALE, check_options, parse_codec
    from hivemerge.protocol.errors import UserInputError

    with pytest.raises(UserInputError, match="scale: must be in"):
        check_options(CODECS["lowrank"], {"rank": 2, "scale": 1e200}, "t")
    with pytest.raises(UserInputError, match="rank: must be an integer"):
        check_options(CODECS["lowrank"], {"rank": 2.0}, "t")
    with pytest.raises(UserInputError, match="block: must be an integer"):
        check_options(CODECS["ternary"], {"block": 8.0}, "t")
    codec, opts = parse_codec(f"lowrank:rank=2,scale={MAX_SCALE}")
    parts = {"a": torch.full((2, 6), 1e150, dtype=torch.float64), "b": torch.full((4, 2), 1e150, dtype=torch.float64)}
    for call in (lambda: codec.decode(torch.zeros(4, 6), parts, torch.float32, (4, 6), opts),
                 lambda: codec.squares(parts, (4, 6), opts)):
        with pytest.raises(UserInputError, match="float32 expected"):
            call()
    # the largest float32 factors at the largest scale still give a finite float64 norm: no overflow to raise
    big = {"a": torch.full((2, 6), 3e38), "b": torch.full((4, 2), 3e38)}
    assert math.isfinite(codec.squares(big, (4, 6), opts))
