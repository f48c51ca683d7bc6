"""``iter_merged``: every method's output tensors handed over in memory, equal byte for byte to
what the same merge writes, in the written order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import layerswap_fast as lf
from layerswap_fast.errors import ConfigError
from support import load_tensors, make_adapter, make_llama_trio, raw_bytes

NUM_LAYERS = 10


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("iter")
    paths = make_llama_trio(root, num_layers=NUM_LAYERS, tie=True, roles=("base", "task", "language", "other"))
    paths["adapter"] = make_adapter(paths["base"], root / "adapter", 1, r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj", "down_proj"])
    return paths


def _mergekit_yaml(p: dict[str, Path], method: str, parameters: str) -> str:
    """A mergekit config of the task and language experts over the base, in bfloat16."""
    return (f"merge_method: {method}\nbase_model: {p['base']}\ndtype: bfloat16\nmodels:\n"
            + "".join(f"  - model: {p[r]}\n    parameters: {{weight: 0.5, {parameters}}}\n" for r in ("task", "language")))


CASES = {
    "swap": ("layer_swap", lambda p: {"task_expert": p["task"], "language_expert": p["language"], "bottom": 3,
                                      "top": 2, "transition_weights": "ramp", "lower_transition": 2}),
    "swap of souped experts": ("layer_swap", lambda p: {"task_expert": [p["task"], p["other"]],
                                                        "language_expert": p["language"]}),
    "swap in f32": ("layer_swap", lambda p: {"task_expert": p["task"], "language_expert": p["language"],
                                             "dtype": "f32"}),
    "swap with an adapter": ("layer_swap", lambda p: {"task_expert": p["adapter"], "language_expert": p["language"],
                                                      "base": p["base"]}),
    "soup": ("soup", lambda p: {"model": [p["task"], p["language"], p["other"]]}),
    "magnitude soup": ("soup", lambda p: {"model": [p["task"], p["language"]], "weights": "magnitude",
                                          "base": p["base"]}),
    "task arithmetic": ("task_arithmetic", lambda p: {"base": p["base"], "model": [p["task"], p["language"]],
                                                      "lam": 0.6}),
    "ties": ("ties", lambda p: {"base": p["base"], "model": [p["task"], p["language"]], "density": 0.3}),
    "mergekit ties": ("mergekit", lambda p: {"yaml": _mergekit_yaml(p, "ties", "density: 0.5")}),
    "mergekit della": ("mergekit", lambda p: {"yaml": _mergekit_yaml(p, "della", "density: 0.5, epsilon: 0.1"),
                                               "random_seed": 7}),
    "revert rows": ("revert", lambda p: {"base": p["base"], "model": p["task"], "row_fraction": 0.4}),
    "revert layers": ("revert", lambda p: {"base": p["base"], "model": p["task"], "layers": "0-2"}),
}


def _written_order(out: Path) -> list[str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    order = []
    for shard in sorted(set(index.values())):
        header_len = int.from_bytes((out / shard).read_bytes()[:8], "little")
        header = json.loads((out / shard).read_bytes()[8:8 + header_len])
        header.pop("__metadata__", None)
        order += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return order


@pytest.mark.parametrize("case", CASES)
def test_iter_merged_equals_the_written_merge(trio, tmp_path, case):
    method, options = CASES[case]
    lf.run(method, tmp_path / "out", options(trio), shard_size="40KB")
    written = load_tensors(tmp_path / "out")
    got = list(lf.iter_merged(method, options(trio)))
    assert [name for name, _ in got] == _written_order(tmp_path / "out")
    for name, tensor in got:
        assert tensor.dtype == written[name].dtype and tensor.shape == written[name].shape, name
        assert raw_bytes(tensor) == raw_bytes(written[name]), name


def test_numpy_arrays_without_torch_tensors(trio, tmp_path):
    options = {"task_expert": trio["task"], "language_expert": trio["language"]}
    lf.run("layer_swap", tmp_path / "out", options)
    written = load_tensors(tmp_path / "out")
    for name, array in lf.iter_merged("layer_swap", options, framework="numpy"):
        assert isinstance(array, np.ndarray) and array.dtype == np.uint16  # bf16 bit patterns
        assert array.tobytes() == raw_bytes(written[name]), name
    for io in ("mmap", "pread"):  # the read path changes how, never what
        for name, array in lf.iter_merged("layer_swap", options, framework="numpy", io=io):
            assert array.tobytes() == raw_bytes(written[name]), (io, name)


def test_a_consumer_may_write_to_its_tensors(trio):
    """Each tensor is the consumer's: writing to one changes neither the inputs nor the next."""
    options = {"task_expert": trio["task"], "language_expert": trio["language"]}
    first = dict(lf.iter_merged("layer_swap", options))
    for tensor in first.values():
        tensor.zero_()
    again = dict(lf.iter_merged("layer_swap", options))
    assert any(t.abs().sum() > 0 for t in again.values())
    assert load_tensors(trio["task"]).keys() == again.keys()


def test_transformers_loads_the_merge_from_memory(trio, tmp_path):
    """load_state_dict(..., assign=True) into a model built from its config: the same logits as
    loading the written merge (the tied lm_head follows the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = {"task_expert": trio["task"], "language_expert": trio["adapter"], "base": trio["base"]}
    lf.run("layer_swap", tmp_path / "out", options)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trio["task"]), dtype=torch.bfloat16)
    result = model.load_state_dict(dict(lf.iter_merged("layer_swap", options)), assign=True, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bad_calls_are_one_line(trio):
    options = {"task_expert": trio["task"], "language_expert": trio["language"]}
    with pytest.raises(ConfigError, match="unknown merge method 'nope'"):
        next(lf.iter_merged("nope", options))
    with pytest.raises(ConfigError, match="framework must be one of auto, torch, numpy"):
        next(lf.iter_merged("layer_swap", options, framework="jax"))
    with pytest.raises(ConfigError, match="device and pin_memory need torch tensors"):
        next(lf.iter_merged("layer_swap", options, framework="numpy", device="cpu"))
    with pytest.raises(ConfigError, match="io must be one of auto, mmap, pread, got 'disk'"):
        next(lf.iter_merged("layer_swap", options, io="disk"))
    with pytest.raises(ConfigError, match="io must be one of auto, mmap, pread, got 'disk'"):
        lf.SwapSession(trio["task"], trio["language"], io="disk")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pin_memory needs a CUDA device"):
            next(lf.iter_merged("layer_swap", options, pin_memory=True))


def test_tensors_moved_to_a_device(trio):
    """``device=`` moves each tensor (here the CPU, the one device every machine has; a GPU run
    is the device check in bench/)."""
    options = {"task_expert": trio["task"], "language_expert": trio["language"]}
    plain = dict(lf.iter_merged("layer_swap", options))
    for name, tensor in lf.iter_merged("layer_swap", options, device="cpu"):
        assert tensor.device.type == "cpu" and torch.equal(tensor, plain[name]), name
