"""mixtral.checkpoint: Hugging Face safetensors checkpoints load by name, lazily, and fail naming file and tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts.weights import load_shard
from mixtral.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    expected_shapes,
    expert_tensor_names,
    write_checkpoint,
)
from mixtral.config import ModelConfig

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT_W2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


def config_of(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_json(model_dir / "config.json")


def weight_map(model_dir: Path) -> dict[str, str]:
    return json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with safetensors itself (the reference)."""
    files = set(weight_map(model_dir).values()) if (model_dir / INDEX_FILE).exists() else {SINGLE_FILE}
    return {name: t for file in sorted(files) for name, t in load_file(str(model_dir / file)).items()}


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    """A writable copy: session checkpoints are shared and never modified."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --- loading ---------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_every_expected_tensor(tiny_checkpoint: Path) -> None:
    config = config_of(tiny_checkpoint)
    shapes = expected_shapes(config)
    assert len(set(weight_map(tiny_checkpoint).values())) > 1  # really sharded

    loaded = Checkpoint(tiny_checkpoint, config).load(shapes, torch.float32)

    reference = all_tensors(tiny_checkpoint)
    assert set(loaded) == set(shapes)
    for name, shape in shapes.items():
        assert tuple(loaded[name].shape) == shape, name
        torch.testing.assert_close(loaded[name], reference[name], rtol=0, atol=0)


def test_load_converts_to_the_requested_dtype(tiny_checkpoint: Path) -> None:
    config = config_of(tiny_checkpoint)
    names = [*expert_tensor_names(config, 1, 2).values(), "model.norm.weight", "lm_head.weight"]

    loaded = Checkpoint(tiny_checkpoint, config).load(names, torch.bfloat16)

    reference = all_tensors(tiny_checkpoint)
    for name in names:
        assert loaded[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded[name], reference[name].to(torch.bfloat16), rtol=0, atol=0)


def test_checkpoint_knows_which_tensors_it_holds(tiny_checkpoint: Path) -> None:
    checkpoint = Checkpoint(tiny_checkpoint, config_of(tiny_checkpoint))

    assert EXPERT_W2 in checkpoint
    assert "model.layers.9.block_sparse_moe.experts.0.w1.weight" not in checkpoint


# --- partial loads ---------------------------------------------------------------------------------


@pytest.fixture
def garbled_except_layer_1_experts(hf_checkpoint: Callable[..., Path], tmp_path: Path
                                   ) -> tuple[Path, Path, list[str]]:
    """(original, copy, garbled shard files): every shard holding no layer-1 expert tensor is garbage."""
    original = hf_checkpoint(max_shard_size="200KB")
    model_dir = copy_of(original, tmp_path)
    config = config_of(model_dir)
    wanted = {name for e in range(config.num_local_experts)
              for name in expert_tensor_names(config, 1, e).values()}
    files = weight_map(model_dir)
    garbled = sorted(set(files.values()) - {files[name] for name in wanted})
    assert garbled and set(files.values()) - set(garbled)  # the split this test relies on
    for file in garbled:
        (model_dir / file).write_bytes(b"garbage!")
    return original, model_dir, garbled


def test_partial_load_reads_only_the_requested_shards(
        garbled_except_layer_1_experts: tuple[Path, Path, list[str]]) -> None:
    original, model_dir, _ = garbled_except_layer_1_experts
    config = config_of(model_dir)
    experts = [(1, e) for e in range(config.num_local_experts)]

    shard = load_shard(Checkpoint(model_dir, config), experts, torch.float32)

    reference = all_tensors(original)
    assert sorted(shard.experts) == experts
    for layer, expert in experts:
        names = expert_tensor_names(config, layer, expert)
        weights = shard.experts[(layer, expert)].plain()
        w13 = torch.cat((reference[names["w1"]], reference[names["w3"]]))
        torch.testing.assert_close(weights.w13, w13, rtol=0, atol=0)
        torch.testing.assert_close(weights.w2, reference[names["w2"]], rtol=0, atol=0)
    assert shard.layer(0) == {}


def test_tensor_from_a_garbage_shard_names_the_file(
        garbled_except_layer_1_experts: tuple[Path, Path, list[str]]) -> None:
    _, model_dir, garbled = garbled_except_layer_1_experts
    config = config_of(model_dir)
    name = expert_tensor_names(config, 0, 0)["w1"]
    file = weight_map(model_dir)[name]
    assert file in garbled

    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        Checkpoint(model_dir, config).load([name], torch.float32)

    assert str(model_dir / file) in str(caught.value)


# --- errors name file and tensor -------------------------------------------------------------------


def test_truncated_single_file_names_the_file(hf_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_of(hf_checkpoint(), tmp_path)
    path = model_dir / SINGLE_FILE
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)

    with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
        Checkpoint(model_dir, config_of(model_dir)).load([Q_PROJ], torch.float32)

    assert str(path) in str(caught.value)


def test_tensor_missing_from_the_file_is_named(hf_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = copy_of(hf_checkpoint(), tmp_path)
    rewrite(model_dir / SINGLE_FILE, lambda tensors: tensors.pop(EXPERT_W2))
    config = config_of(model_dir)
    checkpoint = Checkpoint(model_dir, config)

    assert EXPERT_W2 not in checkpoint
    with pytest.raises(CheckpointError, match="missing") as caught:
        load_shard(checkpoint, [(1, 3)], torch.float32)
    assert EXPERT_W2 in str(caught.value)
    assert str(model_dir) in str(caught.value)
    load_shard(checkpoint, [(1, 2)], torch.float32)  # the other experts still load


def test_tensor_listed_in_the_index_but_absent_from_its_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = copy_of(tiny_checkpoint, tmp_path)
    shard = model_dir / weight_map(model_dir)[EXPERT_W2]
    rewrite(shard, lambda tensors: tensors.pop(EXPERT_W2))

    with pytest.raises(CheckpointError, match="absent from the file") as caught:
        Checkpoint(model_dir, config_of(model_dir)).load([EXPERT_W2], torch.float32)

    assert str(shard) in str(caught.value)
    assert EXPERT_W2 in str(caught.value)


def test_shape_mismatch_names_file_tensor_and_both_shapes(hf_checkpoint: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    model_dir = copy_of(hf_checkpoint(), tmp_path)
    path = model_dir / SINGLE_FILE
    rewrite(path, lambda tensors: tensors.update({Q_PROJ: torch.zeros(32, 64)}))
    config = config_of(model_dir)
    assert expected_shapes(config)[Q_PROJ] == (64, 64)

    with pytest.raises(CheckpointError) as caught:
        Checkpoint(model_dir, config).load([Q_PROJ], torch.float32)

    message = str(caught.value)
    assert str(path) in message
    assert Q_PROJ in message
    assert "[32, 64]" in message and "[64, 64]" in message


def test_shard_listed_in_the_index_but_absent_names_the_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = copy_of(tiny_checkpoint, tmp_path)
    shard = model_dir / weight_map(model_dir)[EXPERT_W2]
    shard.unlink()

    with pytest.raises(CheckpointError, match="missing") as caught:
        Checkpoint(model_dir, config_of(model_dir))

    assert str(shard) in str(caught.value)


def test_directory_without_safetensors_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", model_dir)

    with pytest.raises(CheckpointError) as caught:
        Checkpoint(model_dir, config_of(model_dir))

    message = str(caught.value)
    assert str(model_dir) in message
    assert SINGLE_FILE in message and INDEX_FILE in message


# --- write_checkpoint ------------------------------------------------------------------------------


def float32_tensors(*numels: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"t{i}.weight": torch.randn(n, generator=generator) for i, n in enumerate(numels)}


def shard_nbytes(path: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def assert_loads_back(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    loaded = Checkpoint(model_dir, ModelConfig()).load(tensors, torch.float32)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_write_checkpoint_without_shard_size_writes_one_file(tmp_path: Path) -> None:
    tensors = float32_tensors(250, 250, 1250)

    write_checkpoint(tmp_path, tensors)

    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    assert_loads_back(tmp_path, tensors)


def test_write_checkpoint_that_fits_one_shard_writes_one_file(tmp_path: Path) -> None:
    tensors = float32_tensors(250, 250)  # 2000 bytes

    write_checkpoint(tmp_path, tensors, shard_bytes=2000)

    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]


def test_write_checkpoint_shards_respect_the_size_and_the_index_covers_them(tmp_path: Path) -> None:
    # 1000, 1000, 1000, 5000 (bigger than a shard), 1000, 400 bytes; shards of at most 2500 bytes
    tensors = float32_tensors(250, 250, 250, 1250, 250, 100)

    write_checkpoint(tmp_path, tensors, shard_bytes=2500)

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert not (tmp_path / SINGLE_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INDEX_FILE, *files])
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    for file in files:
        held = [n for n, f in index["weight_map"].items() if f == file]
        assert shard_nbytes(tmp_path / file) <= 2500 or len(held) == 1, (file, held)
        assert set(load_file(str(tmp_path / file))) == set(held)
    big = index["weight_map"]["t3.weight"]
    assert [n for n, f in index["weight_map"].items() if f == big] == ["t3.weight"]
    assert len(files) == 4  # [t0, t1], [t2], [t3], [t4, t5]
    assert_loads_back(tmp_path, tensors)


def test_write_checkpoint_of_a_model_is_read_back_by_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    tensors = all_tensors(tiny_checkpoint)
    config = config_of(tiny_checkpoint)

    write_checkpoint(tmp_path, tensors, shard_bytes=300_000)

    loaded = Checkpoint(tmp_path, config).load(expected_shapes(config), torch.float32)
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, tensors[name], rtol=0, atol=0)


def test_rewriting_a_sharded_directory_as_one_file_loads_the_new_weights(tmp_path: Path) -> None:
    old, new = float32_tensors(250, 250, 250), {k: -v for k, v in float32_tensors(250, 250, 250).items()}
    write_checkpoint(tmp_path, old, shard_bytes=1000)

    write_checkpoint(tmp_path, new)

    assert_loads_back(tmp_path, new)
