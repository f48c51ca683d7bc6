"""``SwapSession``: a loaded model kept equal to the on-disk merge of the last configuration,
rewriting only what changes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import layerswap_fast as lf
from layerswap_fast.errors import ConfigError
from support import layer_of, load_tensors, make_adapter, make_llama_trio, raw_bytes

NUM_LAYERS = 12


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("session")
    paths = make_llama_trio(root, num_layers=NUM_LAYERS, tie=True)
    paths["adapter"] = make_adapter(paths["base"], root / "adapter", 3, r=4, lora_alpha=4,
                                    target_modules=["q_proj", "up_proj", "embed_tokens"])
    return paths


def _random_config(rng: random.Random) -> lf.SwapConfig:
    bottom, top = rng.randint(0, 5), rng.randint(0, 3)
    lt, ut = rng.randint(0, 2), rng.randint(0, 2)
    return lf.SwapConfig(bottom=bottom, top=top, lower_transition=lt, upper_transition=ut,
                         transition_weights=rng.choice(["uniform", "ramp"]),
                         non_layer=rng.choice(["average", "task", "language"]))


def _assert_state_is_merge(state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> None:
    assert set(merged) <= set(state)
    for name, tensor in merged.items():
        assert raw_bytes(state[name]) == raw_bytes(tensor), name


@pytest.mark.parametrize("language", ["language", "adapter"])
def test_a_random_walk_equals_a_fresh_merge_after_every_step(trio, tmp_path, language):
    session = lf.SwapSession(trio["task"], trio[language], base=trio["base"])
    rng = random.Random(7)
    for step in range(6):
        config = _random_config(rng)
        report = session.apply(config)
        out = tmp_path / f"step{step}"
        lf.merge(trio["task"], trio[language], out, config, base=trio["base"])
        _assert_state_is_merge(session.tensors, load_tensors(out))
        assert len(report.changed) == len(set(report.changed))


def test_moving_bottom_rewrites_two_layers(trio):
    session = lf.SwapSession(trio["task"], trio["language"])
    first = session.apply(lf.SwapConfig(bottom=5))
    assert len(first.changed) == len(load_tensors(trio["task"]))  # the first apply writes everything
    moved = session.apply({"bottom": 4})
    assert {layer_of(n) for n in moved.changed} == {4, 5}
    per_layer = sum(1 for n in load_tensors(trio["task"]) if layer_of(n) == 4)
    assert len(moved.changed) == 2 * per_layer
    assert session.apply({"bottom": 4}).changed == ()


def test_a_transformers_model_is_updated_in_place(trio, tmp_path):
    """Parameters are copied into, never replaced: the model's storage stays where it was, and
    its logits are those of the written merge (the tied lm_head follows the embedding)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(trio["base"])
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    session = lf.SwapSession(trio["task"], trio["adapter"], model, base=trio["base"])
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for config in (lf.SwapConfig(), lf.SwapConfig(bottom=3, top=1, transition_weights="ramp")):
        session.apply(config)
        lf.merge(trio["task"], trio["adapter"], tmp_path / f"b{config.bottom}", config, base=trio["base"])
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / f"b{config.bottom}")
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers


def test_a_bf16_model_is_written_in_place_and_resident_layers_are_read_once(trio, tmp_path, monkeypatch):
    """A model holding the merge's dtype gets each copy and blend made straight into its
    parameters; with ``resident``, the experts' tensors are read from their files once, and a walk
    back and forth reads nothing more, and still equals the written merge at every step."""
    from transformers import AutoModelForCausalLM
    from layerswap_fast.formats.checkpoint import Checkpoint
    model = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.bfloat16)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    reads = []
    real = Checkpoint.input_file

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def read_into(self, offset, out):
            reads.append(offset)
            self.f.read_into(offset, out)

    merged = {}
    for bottom in (4, 5):
        lf.merge(trio["task"], trio["language"], tmp_path / f"b{bottom}", lf.SwapConfig(bottom=bottom))
        merged[bottom] = load_tensors(tmp_path / f"b{bottom}")
    monkeypatch.setattr(Checkpoint, "input_file", lambda self, path: Counting(real(self, path)))
    session = lf.SwapSession(trio["task"], trio["language"], model, resident=True)
    for step, bottom in enumerate([5, 4, 5, 4, 5]):
        session.apply({"bottom": bottom})
        if step == 1:
            first_reads = len(reads)
        _assert_state_is_merge(model.state_dict(), merged[bottom])
    assert first_reads and len(reads) == first_reads
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("resident", [True, 1 << 40])
def test_device_resident_layers_are_blended_on_the_device(trio, tmp_path, monkeypatch, resident):
    """For a model on an accelerator with ``resident``, the experts' tensors are kept on its device
    and copies and blends are made there by the Triton blend kernel (here its interpreter, on
    CPU tensors the session takes for a device's): the model equals the written merge at every
    step, its parameters keep their storage, and nothing goes through host-side blending."""
    from transformers import AutoModelForCausalLM
    import layerswap_fast.session as session_module
    from layerswap_fast.engine import memory
    model = AutoModelForCausalLM.from_pretrained(trio["base"], dtype=torch.bfloat16)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    merged, ramp = {}, {"lower_transition": 2, "transition_weights": "ramp"}  # weights other than 1/2
    for bottom in (4, 5):
        lf.merge(trio["task"], trio["language"], tmp_path / f"b{bottom}", lf.SwapConfig(bottom=bottom, **ramp))
        merged[bottom] = load_tensors(tmp_path / f"b{bottom}")
    monkeypatch.setattr(session_module, "_on_accelerator", lambda p: True)
    monkeypatch.setattr(memory.DirectFiller, "fill", lambda *a: pytest.fail("filled on the host"))
    session = lf.SwapSession(trio["task"], trio["language"], model, resident=resident)
    for bottom in [5, 4, 5, 4]:
        session.apply({"bottom": bottom, **ramp})
        _assert_state_is_merge(model.state_dict(), merged[bottom])
    kept = session._on_device._kept
    assert kept and all(t.device == torch.device("cpu") and t.dtype == torch.uint8 for t in kept.values())
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers


def test_a_load_weights_hook_receives_the_changes(trio):
    class Consumer:
        def __init__(self) -> None:
            self.received: dict[str, torch.Tensor] = {}

        def load_weights(self, weights):
            for name, tensor in weights:
                self.received[name] = tensor.clone()

    consumer = Consumer()
    session = lf.SwapSession(trio["task"], trio["language"], consumer)
    session.apply(lf.SwapConfig(bottom=5))
    consumer.received.clear()
    report = session.apply(lf.SwapConfig(bottom=6))
    assert sorted(consumer.received) == sorted(report.changed)


def test_bad_sessions_are_one_line(trio):
    with pytest.raises(ConfigError, match="unknown swap option 'bottm'"):
        lf.SwapSession(trio["task"], trio["language"]).apply({"bottm": 3})
    with pytest.raises(ConfigError, match="must be a torch module or have a load_weights"):
        lf.SwapSession(trio["task"], trio["language"], object())
    with pytest.raises(ConfigError, match="the swap needs"):
        lf.SwapSession(trio["task"], trio["language"]).apply({"bottom": 11})
    for bad in ("abc", -1, 1.5):
        with pytest.raises(ConfigError, match=f"resident must be True, False or a number of bytes, got {bad!r}"):
            lf.SwapSession(trio["task"], trio["language"], resident=bad)
