"""Fact sentences: sentence split, resumable cache, the OpenAI path against a local test server
(real openai client; a second run asks nothing), the local-model path (fake and tiny SageModel),
--fill. Run: python -m pytest -q tests/test_facts.py"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from sage.config import LLMConfig, SageConfig, VisionConfig
from sage.data.prompts import FACT_PROMPTS
from sage.data.schema import load_jsonl
from sage.facts import FactCache, collect_facts, model_asker, select_facts, split_sentences
from sage.tools.facts import main
from sage.tokenizer import Tokenizer

KEY = "sk-test-secret-0123456789"


def test_split_and_select():
    assert split_sentences(" A washer is round.  It has a hole!\nIs it flat? yes") == [
        "A washer is round.", "It has a hole!", "Is it flat?", "yes"]
    assert select_facts(["One. Two.", "", "Three. Four."], 3) == ["One.", "Two.", "Three."]


@pytest.fixture
def data(tmp_path):
    """3 records over 2 test images; the JSONL's folder is the data root."""
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", (20, 10), color).save(tmp_path / "img" / f"{name}.png")
    recs = []
    for i, img in enumerate(["img/a.png", "img/a.png", "img/b.png"]):
        recs.append({"id": f"r{i}", "test_image": img, "reference_image": None,
                     "level": "standard", "group": f"g{i}", "question": "Any defect?",
                     "answers": ["Yes. a", "Yes.", "No.", "No. b"], "label": "yes"})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def server():
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that records each request."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"path": self.path, "auth": self.headers.get("Authorization"),
                          "body": body})
            content = body["messages"][0]["content"]
            k = FACT_PROMPTS.index(next(c["text"] for c in content if c["type"] == "text"))
            reply = {"id": "c", "object": "chat.completion", "created": 0,
                     "model": body["model"], "choices": [{
                         "index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": f"Fact {k} first. Fact {k} second!"}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            out = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", calls
    httpd.shutdown()
    httpd.server_close()


def test_openai_path_cache_and_fill(data, server, monkeypatch, capsys):
    url, calls = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cache = data.parent / "facts.jsonl"
    argv = ["--data", str(data), "--out", str(cache), "--openai", "--model-name", "vlm-test",
            "--base-url", url, "--n-facts", "3"]
    main(argv)
    assert len(calls) == 2 * len(FACT_PROMPTS)  # 2 distinct test images x 4 prompts
    first = calls[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {KEY}"
    assert first["body"]["model"] == "vlm-test"
    img = next(c for c in first["body"]["messages"][0]["content"] if c["type"] == "image_url")
    assert img["image_url"]["url"].startswith("data:image/png;base64,")
    entries = [json.loads(l) for l in cache.read_text().splitlines()]
    assert [e["test_image"] for e in entries] == ["img/a.png", "img/b.png"]
    assert entries[0]["facts"] == ["Fact 0 first.", "Fact 0 second!", "Fact 1 first."]
    assert entries[0]["source"] == "openai:vlm-test"
    # a second run (with --fill) asks nothing new and writes the facts into the records
    main(argv + ["--fill"])
    assert len(calls) == 2 * len(FACT_PROMPTS)
    recs = load_jsonl(data)
    assert recs[2]["facts"] == ["Fact 0 first.", "Fact 0 second!", "Fact 1 first."]
    out = capsys.readouterr()
    assert KEY not in out.out + out.err  # the key is never logged
    assert not list(data.parent.glob("*.tmp"))


def test_cache_resumes_after_a_truncated_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"test_image": "a.png", "facts": ["A."], "source": "x"}) + "\n"
                    + '{"test_image": "b.png", "fac')  # killed mid-write
    cache = FactCache(path)
    assert "a.png" in cache and "b.png" not in cache
    asked = []

    def ask(images):
        asked.extend(images)
        return [["B one. B two."] for _ in images]

    assert collect_facts(["a.png", "b.png", "a.png"], cache, ask, "fake", 2) == 1
    assert asked == ["b.png"]
    reread = FactCache(path)
    assert reread.facts("b.png") == ["B one.", "B two."] and len(reread) == 2
    with pytest.raises(ValueError, match="1 test image.*'c.png'.*--model DIR or --openai"):
        collect_facts(["c.png"], reread, None, "", 2)


# ----------------------------------------------------------------------------- local model

CORPUS = ["Washers often show scratches.", "A normal washer is a flat ring.",
          "Is there a scratch?"] + list(FACT_PROMPTS)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 10) + "\n")
    return Tokenizer.train(d / "corpus.txt", d / "tok", vocab_size=400)


def micro_cfg(tok):
    """56 px tiles -> 4 LLM tokens per tile."""
    return SageConfig(vision=VisionConfig(image_size=56, patch_size=14, dim=32, n_layers=1,
                                          n_heads=2, ffn_dim=64),
                      llm=LLMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, ffn_dim=64, max_seq_len=512),
                      n_facts=3, top_k=2, fusion_heads=2)


class FakeModel:
    """generate(): row b answers 'Fact b. Other b.' then <|im_end|> and padding."""

    def __init__(self, tok):
        self.tokenizer, self.cfg, self.batches = tok, micro_cfg(tok), []

    def generate(self, batch, max_new_tokens=64, decode="eager"):
        assert decode in ("eager", "static", "graph")  # model_asker passes SageModel's choice
        self.batches.append(batch)
        tok = self.tokenizer
        rows = [tok.encode(f"Fact {b}. Other {b}.") + [tok.im_end_id]
                for b in range(batch["input_ids"].shape[0])]
        width = max(map(len, rows)) + 2
        return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])


def test_local_model_path_with_fake(data, tok):
    model = FakeModel(tok)
    cache = FactCache(data.parent / "facts.jsonl")
    ask = model_asker(model, data.parent)
    n = collect_facts(["img/a.png", "img/b.png"], cache, ask, "model:fake", 3, batch_size=2)
    assert n == 2 and len(model.batches) == 1  # both images in one generate call
    batch = model.batches[0]
    P = len(FACT_PROMPTS)
    assert batch["input_ids"].shape[0] == 2 * P and batch["pixel_ref"] is None
    assert batch["attention_mask"][:, -1].all()  # left padded for generation
    assert ((batch["input_ids"] == tok.img_context_id).sum(1) == 4).all()  # 4 tokens x 1 tile
    assert not (batch["input_ids"] == tok.fact_context_id).any()  # plain VLM prompt
    # image a = rows 0..3, image b = rows 4..7; first 3 sentences in prompt order
    assert cache.facts("img/a.png") == ["Fact 0.", "Other 0.", "Fact 1."]
    assert cache.facts("img/b.png") == ["Fact 4.", "Other 4.", "Fact 5."]


def test_local_model_path_with_tiny_sage_model(data, tok):
    from sage.models.sage import SageModel

    torch.manual_seed(0)
    model = SageModel(micro_cfg(tok))  # facts_mode "fe": the asker switches it to "none"
    model.init_weights()
    model.tokenizer = tok
    model.eval()
    cache = FactCache(data.parent / "facts.jsonl")
    ask = model_asker(model, data.parent, max_new_tokens=4)
    assert collect_facts(["img/a.png", "img/b.png"], cache, ask, "model:tiny", 3, 2) == 2
    assert model.cfg.facts_mode == "none" and len(cache) == 2
    assert all(isinstance(s, str) for s in cache.facts("img/a.png"))
