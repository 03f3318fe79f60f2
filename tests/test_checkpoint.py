# Streaming load, sharded export, errors, FSDP2. python -m pytest -q tests/test_checkpoint.py
import json
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import sage

from sage.checkpoint import load_into, model_tensors
from sage.export import save_pretrained, save_state_dict
from sage.config import LLMConfig, SageConfig
from sage.names import HERMES2_SYSTEM_MESSAGE
from sage.names import (INTERNVL_KEY_MAP, INTERNVL_KEY_MAP_INV, LLAMA_KEY_MAP, LLAMA_KEY_MAP_INV,
                        map_key)
from sage.safetensors_io import INDEX_FILE, SINGLE_FILE, checkpoint_dtype, read_checkpoint_index

load_pretrained = sage.load_pretrained  # SageModel.from_pretrained

# ----------------------------------------------------------------------------- stand-ins
# Small modules named like the contract's SageModel (vision / adapter / llm / fusion /
# fact_proj), so the generic machinery is tested without the real model code.


class Owner(nn.Module):
    """A module whose init_weights() fills every parameter with a known constant."""

    def __init__(self, value: float, **children: nn.Module):
        super().__init__()
        self.value = value
        for name, child in children.items():
            self.add_module(name, child)

    def init_weights(self) -> None:
        for p in self.parameters():
            p.fill_(self.value)


def stand_in() -> nn.Module:
    m = nn.Module()
    m.vision = nn.Module()
    m.vision.encoder = nn.ModuleDict({"layers": nn.ModuleList(
        Owner(0.0, norm1=nn.LayerNorm(6), mlp=Owner(0.0, fc1=nn.Linear(6, 12)))
        for _ in range(2))})
    m.adapter = Owner(0.0, norm=nn.LayerNorm(24), fc1=nn.Linear(24, 8), fc2=nn.Linear(8, 8))
    m.llm = nn.Module()
    m.llm.embed_tokens = nn.Embedding(11, 8)
    m.llm.layers = nn.ModuleList(
        Owner(0.0, self_attn=Owner(0.0, q_proj=nn.Linear(8, 8, bias=False))) for _ in range(3))
    m.llm.lm_head = nn.Linear(8, 11, bias=False)
    m.fusion = Owner(0.5, q_proj=nn.Linear(8, 8))
    m.fact_proj = Owner(0.25, fc=nn.Linear(8, 8))
    # a computed buffer (like RoPE's inv_freq would be): never saved, never expected
    m.llm.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
    return m


def filled_stand_in(gen: torch.Generator) -> nn.Module:
    m = stand_in()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return m


def meta_stand_in() -> nn.Module:
    with torch.device("meta"):
        return stand_in()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), f"{k}: max diff {(ta[k] - tb[k]).abs().max()}"


def save_published(state: dict, directory, n_shards: int = 1) -> None:
    """Write tensors with upstream safetensors (independent of our writer), HF layout."""
    os.makedirs(directory, exist_ok=True)
    keys = list(state)
    if n_shards == 1:
        save_file(state, os.path.join(directory, SINGLE_FILE))
        return
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::n_shards]}
        save_file(part, os.path.join(directory, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def published_state(model: nn.Module) -> dict:
    """The model's tensors under InternVL2 names (inverse map), cloned."""
    return {map_key(k, INTERNVL_KEY_MAP_INV): v.detach().clone()
            for k, v in model_tensors(model).items()}


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("max_shard_bytes", [2**31, 600])
def test_round_trip_bit_exact(gen, tmp_path, max_shard_bytes):
    src = filled_stand_in(gen)
    src.llm.lm_head.weight.data = src.llm.lm_head.weight.data.bfloat16()  # mixed dtypes
    save_state_dict(model_tensors(src), SageConfig.preset("tiny"), tmp_path / "ck",
                    max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(tmp_path / "ck"))
    if max_shard_bytes > 2**20:
        assert files == ["config.json", SINGLE_FILE]
    else:
        assert INDEX_FILE in files and len(files) > 4
        for f in files:  # every shard under the threshold, unless it holds one big tensor
            if f.endswith(".safetensors"):
                assert (os.path.getsize(tmp_path / "ck" / f) - 1000 <= max_shard_bytes
                        or len(load_file(tmp_path / "ck" / f)) == 1)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # temp dir renamed away
    dst = meta_stand_in()
    dst.llm.lm_head.to(torch.bfloat16)
    report = load_into(dst, tmp_path / "ck", INTERNVL_KEY_MAP)
    assert_same(src, dst)
    assert report.n_loaded == len(model_tensors(src)) and not report.new
    # computed, non-persistent buffers are neither saved nor expected
    assert "llm.inv_freq" not in read_checkpoint_index(tmp_path / "ck")


def test_upstream_writer_and_skipped_keys_load(gen, tmp_path):
    src = filled_stand_in(gen)
    state = published_state(src)
    state["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_published(state, tmp_path, n_shards=3)
    dst = meta_stand_in()
    report = load_into(dst, tmp_path, INTERNVL_KEY_MAP)
    assert_same(src, dst)
    assert report.skipped == ["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_load_into_materialised_model_in_place_with_dtype(gen, tmp_path):
    src = filled_stand_in(gen)
    save_published(published_state(src), tmp_path)
    dst = stand_in()  # materialised (case b)
    q = dst.llm.layers[1].self_attn.q_proj.weight
    load_into(dst, tmp_path, INTERNVL_KEY_MAP)
    assert dst.llm.layers[1].self_attn.q_proj.weight is q  # copied in place
    assert_same(src, dst)
    half = meta_stand_in()
    load_into(half, tmp_path, INTERNVL_KEY_MAP, dtype=torch.bfloat16)
    for k, t in model_tensors(half).items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, model_tensors(src)[k].bfloat16()), k


# ----------------------------------------------------------------------------- strict errors


def test_strict_error_lists_missing_unexpected_and_shape(gen, tmp_path):
    state = published_state(filled_stand_in(gen))
    del state["mlp1.1.bias"]  # missing
    state["language_model.model.layers.9.self_attn.q_proj.weight"] = torch.zeros(8, 8)  # no layer 9
    state["vision_model.some_new_thing"] = torch.zeros(1)  # no key-map entry
    state["language_model.lm_head.weight"] = torch.zeros(12, 8)  # wrong shape
    save_published(state, tmp_path, n_shards=2)
    dst = meta_stand_in()
    with pytest.raises(ValueError) as e:
        load_into(dst, tmp_path, INTERNVL_KEY_MAP)
    msg = str(e.value)
    assert "missing from the checkpoint (1):\n    adapter.fc1.bias" in msg
    assert "llm.layers.9.self_attn.q_proj.weight: not in the model" in msg
    assert "vision_model.some_new_thing (in model-0000" in msg
    assert "llm.lm_head.weight <- language_model.lm_head.weight in model-0000" in msg
    assert "expected (11, 8), found (12, 8)" in msg
    assert all(t.device.type == "meta" for t in model_tensors(dst).values())  # nothing allocated
    report = load_into(dst, tmp_path, INTERNVL_KEY_MAP, strict=False)
    assert report.missing == ["adapter.fc1.bias"] and len(report.unexpected) == 2
    assert len(report.mismatched) == 1 and "1 missing" in str(report)


def test_new_keys_initialised_by_owner_and_reported(gen, tmp_path):
    src = filled_stand_in(gen)
    state = {k: v for k, v in published_state(src).items() if not k.startswith("sage.")}
    save_published(state, tmp_path)
    dst = meta_stand_in()
    report = load_into(dst, tmp_path, INTERNVL_KEY_MAP, new_ok=("fusion.", "fact_proj."))
    assert torch.equal(dst.fusion.q_proj.weight, torch.full((8, 8), 0.5))
    assert torch.equal(dst.fact_proj.fc.bias, torch.full((8,), 0.25))
    assert torch.equal(dst.adapter.fc2.weight, src.adapter.fc2.weight)
    assert report.initialised == ["fusion.", "fact_proj."]
    line = str(report)
    assert "\n" not in line and "fusion.* (2 tensors), fact_proj.* (2 tensors)" in line
    # without init_weights() on the owner the report says the caller must initialise it
    plain = meta_stand_in()
    plain.fusion = nn.Module()
    with torch.device("meta"):
        plain.fusion.q_proj = nn.Linear(8, 8)
    report = load_into(plain, tmp_path, INTERNVL_KEY_MAP, new_ok=("fusion.", "fact_proj."))
    assert report.initialised == ["fact_proj."] and "caller must initialise: fusion." in str(report)


# ----------------------------------------------------------------------------- broken files


def test_corrupt_or_truncated_header_names_file(gen, tmp_path):
    save_published(published_state(filled_stand_in(gen)), tmp_path)
    path = tmp_path / SINGLE_FILE
    good = path.read_bytes()
    for bad in (b"\x07", good[:8] + b"{not json" + good[17:], good[:len(good) // 2]):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"{path}: corrupt or truncated"):
            load_into(meta_stand_in(), tmp_path, INTERNVL_KEY_MAP)


def test_missing_shard_and_broken_index(gen, tmp_path):
    save_published(published_state(filled_stand_in(gen)), tmp_path, n_shards=2)
    index = tmp_path / INDEX_FILE
    text = index.read_text()
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"{index}: names shard "
                       r"'model-00002-of-00002.safetensors', which does not exist"):
        load_into(meta_stand_in(), tmp_path, INTERNVL_KEY_MAP)
    index.write_text(text.replace('"weight_map": {', '"weight_map": {,', 1))
    with pytest.raises(ValueError, match=rf"{index}: line 3: invalid JSON"):
        load_into(meta_stand_in(), tmp_path, INTERNVL_KEY_MAP)
    index.write_text("{}")
    with pytest.raises(KeyError, match="weight_map"):
        load_into(meta_stand_in(), tmp_path, INTERNVL_KEY_MAP)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or"):
        load_into(meta_stand_in(), tmp_path / "nowhere", INTERNVL_KEY_MAP)


def test_never_overwrites_unless_asked(gen, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    sd = model_tensors(filled_stand_in(gen))
    with pytest.raises(FileExistsError, match="not empty"):
        save_state_dict(sd, SageConfig.preset("tiny"), out)
    assert os.listdir(out) == ["notes.txt"]
    save_state_dict(sd, SageConfig.preset("tiny"), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", SINGLE_FILE]
    assert sorted(os.listdir(tmp_path)) == ["export"]


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from sage.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text("\n".join(f"the washer {i} has a scratch at the top left"
                                       for i in range(50)))
    Tokenizer.train(d / "c.txt", d / "tok", vocab_size=400)
    return d / "tok"


@pytest.fixture(scope="module")
def sage_src():
    """The tiny SageModel, initialised once for this module (init is the slow part)."""
    from sage.models.sage import SageModel

    torch.manual_seed(0)
    model = SageModel(SageConfig.preset("tiny"))
    model.init_weights()
    with torch.no_grad():  # the head starts at zero: make the round trip see real numbers
        model.fact_proj.fc.weight.normal_()
    return model


@pytest.fixture(scope="module")
def sage_dir(sage_src, tokenizer_dir, tmp_path_factory):
    """sage_src exported in the InternVL2 layout, sharded, with a tokenizer."""
    from sage.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("sage") / "m"
    save_pretrained(sage_src, out, tokenizer=Tokenizer.from_pretrained(tokenizer_dir),
                    max_shard_bytes=2**22)
    return out


def copy_with_config(src, dst, edit) -> None:
    """A copy of checkpoint dir src whose config.json went through edit(dict)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))


def test_sage_model_round_trip_with_tokenizer(sage_src, sage_dir, tokenizer_dir):
    from sage.tokenizer import Tokenizer

    assert (sage_dir / INDEX_FILE).is_file() and (sage_dir / "tokenizer.model").is_file()
    model = sage.load_pretrained(sage_dir)  # the package entry point forwards to checkpoint
    assert_same(sage_src, model)
    assert model.cfg == sage_src.cfg and not model.training
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    assert model.tokenizer.encode("the washer") == tok.encode("the washer")
    assert not model.load_report.new


def test_sage_model_parts_export_as_plain_llama_and_internvit(sage_src, tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    from sage.models.intern_vit import InternViT

    save_pretrained(sage_src, tmp_path / "llm", layout="llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llm", dtype=torch.float32)
    ids = torch.randint(0, 2048, (1, 6), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(sage_src.llm.eval()(input_ids=ids), hf.eval()(ids).logits,
                                   atol=1e-5, rtol=0)
    save_pretrained(sage_src, tmp_path / "vit", layout="internvit")
    assert_same(sage_src.vision, InternViT.from_pretrained(tmp_path / "vit"))


def test_sfe_start_without_fusion_weights_gets_new_modules(sage_src, tokenizer_dir, tmp_path):
    # a SAGE config (facts_mode "fe") over weights without sage.* keys: the start of SFE
    from sage.models.sage import SageModel
    from sage.tokenizer import Tokenizer

    sd = {k: v for k, v in model_tensors(sage_src).items()
          if not k.startswith(("fusion.", "fact_proj."))}
    save_state_dict(sd, sage_src.cfg, tmp_path / "plain", dtype=torch.bfloat16,
                    tokenizer=Tokenizer.from_pretrained(tokenizer_dir))
    assert not [k for k in read_checkpoint_index(tmp_path / "plain") if k.startswith("sage.")]
    model = load_pretrained(tmp_path / "plain")
    assert model.llm.lm_head.weight.dtype == torch.bfloat16  # the checkpoint's dtype
    assert torch.equal(model.llm.lm_head.weight, sage_src.llm.lm_head.weight.bfloat16())
    assert model.fact_proj.fc.weight.float().std().item() == pytest.approx(
        sage_src.cfg.fact_head_init, rel=0.1)  # the head's own init (SageConfig.fact_head_init)
    assert model.fusion.q_proj.weight.float().std().item() == pytest.approx(
        0.02 if sage_src.cfg.fusion_init == "small" else 256 ** -0.5, rel=0.1)
    assert model.load_report.initialised == ["fusion.", "fact_proj."]
    assert "fusion.* (8 tensors), fact_proj.* (4 tensors)" in str(model.load_report)
    with torch.device("meta"):
        meta = SageModel(sage_src.cfg)
    with pytest.raises(ValueError, match="fact_proj.fc.weight"):  # not new_ok: missing
        load_into(meta, tmp_path / "plain", INTERNVL_KEY_MAP)


def test_config_missing_field_names_file_and_key(sage_dir, tmp_path):
    copy_with_config(sage_dir, tmp_path / "m", lambda c: c["llm_config"].pop("hidden_size"))
    with pytest.raises(KeyError, match=rf"{tmp_path / 'm' / 'config.json'}.*"
                                       r"'llm_config.hidden_size'"):
        load_pretrained(tmp_path / "m")


def test_vocab_size_taken_from_checkpoint(sage_dir, tmp_path):
    # like InternVL2: config.json says less than the embedding table holds
    copy_with_config(sage_dir, tmp_path / "m", lambda c: c["llm_config"].update(vocab_size=2000))
    assert load_pretrained(tmp_path / "m").cfg.llm.vocab_size == 2048


def test_llama_layout_loads_in_transformers_with_equal_logits(tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    from sage.models.llama import Llama

    torch.manual_seed(0)
    ours = Llama(LLMConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=48, rope_theta=5e6, max_seq_len=64))
    ours.init_weights()
    save_pretrained(ours, tmp_path, layout="llama")
    assert "model.layers.1.mlp.down_proj.weight" in read_checkpoint_index(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 7), generator=gen)
    with torch.no_grad():
        # fp32 both sides; differences are summation order only
        torch.testing.assert_close(ours.eval()(input_ids=ids), hf(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    assert_same(ours, Llama.from_pretrained(tmp_path))


def test_tied_embeddings_saved_once_and_retied(tmp_path):
    from sage.models.llama import Llama

    cfg = LLMConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24,
                    max_seq_len=32, tie_embeddings=True)
    torch.manual_seed(0)
    src = Llama(cfg)
    src.init_weights()
    save_pretrained(src, tmp_path, layout="llama")
    assert "lm_head.weight" not in read_checkpoint_index(tmp_path)  # as HF saves tied weights
    with torch.device("meta"):
        dst = Llama(cfg)
    load_into(dst, tmp_path, LLAMA_KEY_MAP)
    assert dst.lm_head.weight is dst.embed_tokens.weight
    assert torch.equal(dst.lm_head.weight, src.embed_tokens.weight)


def test_internvit_layout_round_trip(tmp_path):
    from sage.models.intern_vit import InternViT

    torch.manual_seed(0)
    src = InternViT(SageConfig.preset("tiny").vision)
    src.init_weights()
    save_pretrained(src, tmp_path, layout="internvit")
    assert "encoder.layers.3.attn.k_norm.weight" in read_checkpoint_index(tmp_path)
    assert_same(src, InternViT.from_pretrained(tmp_path))


# ----------------------------------------------------------------------------- FSDP2 (2 ranks)

FSDP_CFG = LLMConfig(vocab_size=67, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                     max_seq_len=64)  # 67 rows: ranks get 34 and 33 (uneven torch.chunk)


def _fsdp_worker(rank: int, world: int, init_file: str, ckpt: str, out: str) -> None:
    import torch.distributed as td
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sage.models.llama import Llama

    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                          world_size=world)
    try:
        with torch.device("meta"):
            model = Llama(FSDP_CFG)
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        report = load_into(model, ckpt, LLAMA_KEY_MAP)  # meta -> to_empty -> this rank's rows
        full = {map_key(k, LLAMA_KEY_MAP): v for k, v in load_file(f"{ckpt}/{SINGLE_FILE}").items()}
        for name, p in model_tensors(model).items():
            rows = full[name].chunk(world)[rank]
            assert torch.equal(p.to_local(), rows), name
        total = sum(v.numel() * v.element_size() for v in full.values())
        sizes = [None] * world
        td.all_gather_object(sizes, report.bytes_read)
        assert sum(sizes) == total and max(sizes) < 0.6 * total, (sizes, total)
        save_pretrained(model, out, layout="llama")  # gathers tensor by tensor, rank 0 writes
        # a column slice (Shard(1), as tensor parallelism would make) goes through get_slice
        from torch.distributed.tensor import Shard, distribute_tensor

        head = nn.Module()
        head.lm_head = nn.Linear(32, 67, bias=False)
        head.lm_head.weight = nn.Parameter(distribute_tensor(torch.zeros(67, 32), mesh, [Shard(1)]))
        load_into(head, ckpt, {"lm_head.weight": "lm_head.weight", "model.*": None})
        assert torch.equal(head.lm_head.weight.to_local(), full["lm_head.weight"].chunk(2, 1)[rank])
    finally:
        td.destroy_process_group()


def test_fsdp2_loads_only_local_rows_and_saves(tmp_path):
    import torch.multiprocessing as mp

    from sage.models.llama import Llama

    torch.manual_seed(0)
    src = Llama(FSDP_CFG)
    src.init_weights()
    save_pretrained(src, tmp_path / "ck", layout="llama")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_fsdp_worker, args=(2, init_file, str(tmp_path / "ck"), str(tmp_path / "out")),
             nprocs=2, join=True)
    a, b = load_file(tmp_path / "ck" / SINGLE_FILE), load_file(tmp_path / "out" / SINGLE_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert LLAMA_KEY_MAP_INV["lm_head.weight"] in a


# ----------------------------------------------------------------------------- issue 15

def test_plain_internvl2_directory_is_the_plain_vlm(sage_src, tokenizer_dir, tmp_path):
    # no sage_config block, no sage.* tensors: facts_mode "none", no fusion modules built
    from sage.data import Collator
    from sage.tokenizer import Tokenizer

    plain = tmp_path / "plain"  # written as InternVL publishes: its names, its config.json
    plain.mkdir()
    save_file({map_key(k, INTERNVL_KEY_MAP_INV): v.contiguous()
               for k, v in model_tensors(sage_src).items()
               if not k.startswith(("fusion.", "fact_proj."))}, plain / "model.safetensors")
    cfg = sage_src.cfg.to_dict()
    del cfg["sage_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(plain)
    model = load_pretrained(plain)
    assert model.cfg.facts_mode == "none" and model.fusion is None and model.fact_proj is None
    assert not [n for n, _ in model.named_parameters() if n.startswith(("fusion", "fact_proj"))]
    assert not model.load_report.new
    ex = {"id": "x", "question": "Is there a scratch?", "facts": [],
          "pixel_test": torch.zeros(1, 3, 224, 224), "pixel_ref": None}
    ids = Collator(model.tokenizer, model.cfg, for_generation=True)([ex])["input_ids"][0]
    text = model.tokenizer.decode(ids, skip_special=False)
    assert model.tokenizer.fact_context_id not in ids.tolist()  # no fact placeholders
    assert "Above is the feature" not in text  # no auxiliary prompt: the plain VLM prompt
    assert text.startswith("<|im_start|>system\n" + HERMES2_SYSTEM_MESSAGE + "<|im_end|>")


def test_model_directory_without_tokenizer_is_named(sage_src, tmp_path):
    save_state_dict(model_tensors(sage_src), sage_src.cfg, tmp_path / "m", dtype=None)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'm'}: no tokenizer.model"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("shard_bytes", [2**30, 2**22])
def test_config_recorded_at_export_is_checked(sage_dir, sage_src, tokenizer_dir, tmp_path,
                                              shard_bytes):
    from sage.tokenizer import Tokenizer

    save_pretrained(sage_src, tmp_path / "m", dtype=None, max_shard_bytes=shard_bytes,
                    tokenizer=Tokenizer.from_pretrained(tokenizer_dir))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["vision_config"]["layer_norm_eps"] = 1e-5  # same shapes, other numbers
    cfg["sage_config"]["system_message"] = "Be brief."  # editable: not a mismatch
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"exported with another config.*"
                                         r"vision_config.layer_norm_eps: 1e-06 at export, 1e-05"):
        load_pretrained(tmp_path / "m")
    cfg["vision_config"]["layer_norm_eps"] = 1e-6
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert load_pretrained(tmp_path / "m").cfg.system_message == "Be brief."


def test_export_writes_transformers_tokenizer_and_generation_files(sage_src, tokenizer_dir,
                                                                    tmp_path, gen):
    transformers = pytest.importorskip("transformers")
    from sage.names import HERMES2_SYSTEM_MESSAGE as SYS
    from sage.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    save_pretrained(sage_src, tmp_path / "llm", layout="llama", tokenizer=tok,
                    dtype=torch.float32)
    files = sorted(f.name for f in (tmp_path / "llm").iterdir())
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "generation_config.json", "config.json"} <= set(files)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llm", dtype=torch.float32)
    assert list(hf.generation_config.eos_token_id) == [tok.eos_id, tok.im_start_id,
                                                        tok.im_end_id]
    assert hf.generation_config.pad_token_id == tok.pad_id == tok.unk_id
    ids = torch.tensor([tok.encode_chat("the washer has a scratch at the top left")[0]])
    with torch.no_grad():  # equal logits on a chat prompt
        torch.testing.assert_close(sage_src.llm.eval()(input_ids=ids), hf.eval()(ids).logits,
                                   atol=1e-5, rtol=0)
    # transformers' slow (sentencepiece) Llama tokenizer gives our ids on chat prompts
    try:  # transformers >= 5: the sentencepiece backend is the slow tokenizer
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
        slow = SentencePieceBackend.from_pretrained(tmp_path / "llm")
    except ImportError:  # transformers 4: LlamaTokenizer
        slow = transformers.AutoTokenizer.from_pretrained(tmp_path / "llm", use_fast=False)
    for system in (SYS, None, ""):
        for answer in (None, "Yes. There is a scratch at the top left."):
            text = tok.render_prompt("<img><IMG_CONTEXT><IMG_CONTEXT></img>\nIs there a "
                                     "scratch on  the washer?", system=system, answer=answer)
            assert slow(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert slow.convert_tokens_to_ids("<FACT_CONTEXT>") == tok.fact_context_id


def test_export_model_is_bf16_by_default(sage_src, tmp_path):
    from sage.runs import export_model

    export_model(sage_src, sage_src.cfg, None, tmp_path / "bf", rank=0)
    export_model(sage_src, sage_src.cfg, None, tmp_path / "fp", rank=0, dtype=torch.float32)
    assert checkpoint_dtype(tmp_path / "bf") == torch.bfloat16
    assert checkpoint_dtype(tmp_path / "fp") == torch.float32
