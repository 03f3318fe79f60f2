"""Safetensors files (sage.safetensors_io): our streaming writer against upstream safetensors,
header parsing and its errors, shard planning, checkpoint dtype.
   python -m pytest -q tests/test_safetensors_io.py"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sage.safetensors_io import (INDEX_FILE, SINGLE_FILE, checkpoint_dtype, plan_shards,
                                 read_checkpoint_index, read_header, write_safetensors)


def tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 5, generator=gen),
            "b.bias": torch.randn(7, generator=gen).bfloat16(),
            "c.ids": torch.arange(6, dtype=torch.int64).view(2, 3),
            "d.scalar": torch.tensor(2.5)}


def test_our_writer_reads_back_with_upstream(gen, tmp_path):
    src = tensors(gen)
    write_safetensors(tmp_path / "x.safetensors", list(src.items()))
    got = load_file(tmp_path / "x.safetensors")  # independent reader
    assert got.keys() == src.keys()
    for k in src:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    # dtype converts floating tensors only; fetch sees every tensor once
    seen = []
    write_safetensors(tmp_path / "h.safetensors", list(src.items()), dtype=torch.float16,
                      fetch=lambda t: seen.append(t.shape) or t)
    half = load_file(tmp_path / "h.safetensors")
    assert half["a.weight"].dtype == torch.float16 and half["c.ids"].dtype == torch.int64
    assert torch.equal(half["b.bias"], src["b.bias"].half()) and len(seen) == 4


def test_header_of_an_upstream_file(gen, tmp_path):
    src = tensors(gen)
    save_file(src, tmp_path / SINGLE_FILE)
    info = read_header(tmp_path / SINGLE_FILE)
    assert {k: (i.dtype, i.shape) for k, i in info.items()} == \
        {k: (t.dtype, tuple(t.shape)) for k, t in src.items()}
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    a = info["a.weight"]  # offset is absolute: the bytes there are the tensor's
    assert raw[a.offset:a.offset + a.nbytes] == src["a.weight"].numpy().tobytes()
    assert read_checkpoint_index(tmp_path).keys() == src.keys()  # a directory


def test_index_of_shards_and_checkpoint_dtype(gen, tmp_path):
    src = tensors(gen)
    save_file({"a.weight": src["a.weight"]}, tmp_path / "s1.safetensors")
    save_file({k: src[k] for k in ("b.bias", "c.ids")}, tmp_path / "s2.safetensors")
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {
        "a.weight": "s1.safetensors", "b.bias": "s2.safetensors", "c.ids": "s2.safetensors"}}))
    index = read_checkpoint_index(tmp_path)
    assert [index[k].file.name for k in ("a.weight", "b.bias")] == ["s1.safetensors",
                                                                    "s2.safetensors"]
    assert checkpoint_dtype(tmp_path) == torch.float32  # 60 fp32 bytes beat 14 bf16 bytes
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"z": "s1.safetensors"}}))
    with pytest.raises(ValueError, match=r"maps 'z' to s1.safetensors, whose header has no"):
        read_checkpoint_index(tmp_path)


def test_corrupt_headers_name_the_file(gen, tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(tensors(gen), path)
    good = path.read_bytes()
    for bad in (b"\x07", good[:8] + b"{not json" + good[17:], good[:len(good) // 2]):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"{path}: corrupt or truncated"):
            read_header(path)


def test_plan_shards_groups_consecutive_tensors():
    ts = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)),
          ("d", torch.zeros(5))]  # 40, 40, 120, 20 bytes in fp32
    shards = plan_shards(ts, max_bytes=100, dtype=None)
    assert [[n for n, _ in s] for s in shards] == [["a", "b"], ["c"], ["d"]]
    halves = plan_shards(ts, max_bytes=100, dtype=torch.bfloat16)  # 20, 20, 60, 10 bytes
    assert [[n for n, _ in s] for s in halves] == [["a", "b", "c"], ["d"]]
