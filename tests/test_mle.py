"""Checks sage/mle.py (judge prompt, parsing, OpenAI client on a local server, cache, CLI).
Run: python -m pytest -q tests/test_mle.py"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai  # noqa: F401  imported here so its ~1 s import is not charged to one test
import pytest

from sage.mle import (SYSTEM_PROMPT, Judge, JudgeCache, MLEFailure, MLEResult, OpenAIJudge,
                      build_messages, cache_key, parse_reply, score_records)
from sage.tools.mle import main

KEY = "sk-test-secret-0123456789"


# ----------------------------------------------------------------------------- fake server

class FakeOpenAI:
    """POST /v1/chat/completions on 127.0.0.1 with scripted replies.

    `script` is a list of actions used in order, then `default` forever. An action is a str
    (the assistant's content), ("status", code, headers), ("sleep", seconds, content) or
    ("raw", body bytes) sent as a 200 JSON reply.
    A callable default gets the request body and returns an action (for concurrent tests).
    """

    def __init__(self, script=(), default='{"type": 5, "location": 4, "logic": 3}'):
        self.script, self.default = list(script), default
        self.requests = []  # (headers dict, body dict) per hit
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.requests.append((headers, body))
                    if self.path != "/v1/chat/completions":
                        action = ("status", 404, {})
                    elif fake.script:
                        action = fake.script.pop(0)
                    else:
                        action = fake.default(body) if callable(fake.default) else fake.default
                if isinstance(action, tuple) and action[0] == "raw":  # a body as given
                    self._send(200, None, raw=action[1])
                    return
                if isinstance(action, tuple) and action[0] == "status":
                    self._send(action[1], {"error": {"message": "scripted", "type": "x"}},
                               action[2])
                    return
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0,
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant",
                                                          "content": action}}]})

            def _send(self, code, obj, headers=None, raw=None):
                data = json.dumps(obj).encode() if raw is None else raw
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # do not wait for a sleeping handler
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def hits(self):
        with self.lock:
            return len(self.requests)


@pytest.fixture
def server():
    servers = []

    def start(*args, **kwargs):
        s = FakeOpenAI(*args, **kwargs)
        s.thread.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def judge_for(srv, tmp_path=None, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 5.0)
    cache = tmp_path / "cache.jsonl" if tmp_path is not None else None
    return OpenAIJudge(model="judge-m", base_url=srv.url, api_key=KEY, cache=cache, **kw)


REC = {"id": "r1", "question": "Is there a scratch on the washer?", "label": "yes",
       "truth": {"anomalous": True, "defect": "scratch", "region": "top-left"},
       "answers": ["Yes. A scratch at the top left.", "Yes, a hole.", "Maybe.", "No."]}


# ----------------------------------------------------------------------------- prompt / parse

def test_build_messages_documented_prompt():
    msgs = build_messages(REC["question"], REC["answers"][0], REC["answers"][2], REC)
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert msgs[1]["content"] == (
        "Question: Is there a scratch on the washer?\n"
        "Ground-truth decision: yes\n"
        'Known facts about the sample: {"anomalous": true, "defect": "scratch", '
        '"region": "top-left"}\n'
        "Expert reference answer: Yes. A scratch at the top left.\n"
        "Candidate answer: Maybe.")
    # no label / truth -> those lines are left out; the key depends on model and prompt
    bare = build_messages("Q?", "ref", "cand", {})
    assert bare[1]["content"] == ("Question: Q?\nExpert reference answer: ref\n"
                                  "Candidate answer: cand")
    assert cache_key("a", bare) != cache_key("b", bare) != cache_key("a", msgs)
    assert cache_key("a", bare) == cache_key("a", build_messages("Q?", "ref", "cand", {}))


def test_parse_reply_accepts_and_rejects():
    assert parse_reply('{"type": 5, "location": 1, "logic": 3}') == MLEResult(5, 1, 3)
    fenced = '```json\n{"logic": 2, "type": 4, "location": 3, "note": "ok"}\n```'
    assert parse_reply(fenced) == MLEResult(4, 3, 2)  # order by key, extra keys ignored
    bad = {"": "empty", "Score: 5/5": "no JSON object", '{"type": 5, location: 4}': "malformed",
           '{"type": 5, "location": 4}': "'logic'", '{"type": 6, "location": 4, "logic": 3}':
           "type=6", '{"type": 4.0, "location": 4, "logic": 3}': "type=4.0",
           '{"type": true, "location": 4, "logic": 3}': "type=True",
           '{"type": "5", "location": 4, "logic": 3}': "type='5'", "[1, 2, 3]": "no JSON object"}
    for text, why in bad.items():
        with pytest.raises(ValueError, match=why.replace("(", r"\(")):
            parse_reply(text)


# ----------------------------------------------------------------------------- OpenAI client

def test_openai_judge_normal_replies(server, tmp_path):
    srv = server(['{"type": 5, "location": 4, "logic": 3}',
                  '{"type": 2, "location": 1, "logic": 1}'])
    judge = judge_for(srv, tmp_path)
    a = judge.score(REC["question"], REC["answers"][0], REC["answers"][0], REC)
    b = judge.score(REC["question"], REC["answers"][0], REC["answers"][3], REC)
    assert (a, b) == (MLEResult(5, 4, 3), MLEResult(2, 1, 1)) and not a.cached
    assert srv.hits == 2
    headers, body = srv.requests[1]
    assert body["model"] == "judge-m" and body["temperature"] == 0.0
    assert body["messages"] == build_messages(REC["question"], REC["answers"][0],
                                              REC["answers"][3], REC)
    assert headers["authorization"] == f"Bearer {KEY}"  # the key goes to the server only
    cache_text = (tmp_path / "cache.jsonl").read_text()
    assert len(cache_text.splitlines()) == 2 and KEY not in cache_text


def test_openai_judge_malformed_then_good(server):
    srv = server(["The answer deserves 5/5.", '{"type": 3, "location": 3, "logic": 2}'])
    res = judge_for(srv).score("Q?", "ref", "cand", {})
    assert res == MLEResult(3, 3, 2) and srv.hits == 2
    repair = srv.requests[1][1]["messages"]  # the second request repeats the prompt + repair
    assert repair[:2] == build_messages("Q?", "ref", "cand", {})
    assert repair[2] == {"role": "assistant", "content": "The answer deserves 5/5."}
    assert "no JSON object" in repair[3]["content"]


def test_openai_judge_429_then_success(server):
    srv = server([("status", 429, {"retry-after-ms": "10"}),
                  '{"type": 1, "location": 2, "logic": 3}'])
    t0 = time.perf_counter()
    res = judge_for(srv, max_retries=2).score("Q?", "ref", "cand", {})
    assert res == MLEResult(1, 2, 3) and srv.hits == 2
    assert time.perf_counter() - t0 < 0.5  # honoured the 10 ms retry-after, not the default backoff


def test_openai_judge_timeout_is_recorded_failure(server, tmp_path):
    srv = server([("sleep", 0.6, '{"type": 5, "location": 5, "logic": 5}')])
    res = judge_for(srv, tmp_path, timeout=0.1, max_retries=0).score("Q?", "ref", "cand", {})
    assert isinstance(res, MLEFailure) and "Timeout" in res.reason
    assert srv.hits == 1
    assert not (tmp_path / "cache.jsonl").exists()  # failures are not cached


def test_openai_judge_cache_hit_makes_no_request(server, tmp_path):
    srv = server()
    first = judge_for(srv, tmp_path).score("Q?", "ref", "cand", {})
    assert srv.hits == 1 and not first.cached
    again = judge_for(srv, tmp_path)  # a new run: the cache file is read back
    res = again.score("Q?", "ref", "cand", {})
    assert res == first and res.cached and srv.hits == 1
    other = again.score("Q?", "ref", "another candidate", {})  # new prompt -> asked
    assert not other.cached and srv.hits == 2


def test_cache_tolerates_cut_short_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    good = {"key": "k1", "model": "m", "type": 4, "location": 4, "logic": 4}
    path.write_text(json.dumps(good) + "\n" + '{"key": "k2", "mo')  # interrupted mid-write
    cache = JudgeCache(path)
    assert cache.get("k1") == MLEResult(4, 4, 4) and cache.get("k2") is None
    cache.put("k3", "m", MLEResult(1, 2, 3))
    assert JudgeCache(path).get("k3") == MLEResult(1, 2, 3)  # appended on a fresh line
    path.write_text('{"key": "x", "type": 9, "location": 4, "logic": 4}\n' + json.dumps(good))
    with pytest.raises(ValueError, match="c.jsonl:1"):  # a bad line in the middle is an error
        JudgeCache(path)


def test_failure_is_reported_not_defaulted(server):
    srv = server(default='{"type": 9, "location": 4, "logic": 3}')  # always out of range
    rec = dict(REC)
    rep = score_records([rec], judge_for(srv, parse_retries=1), workers=2)
    assert rep.n_failed == 4 and rep.n_judged == 0 and "mle" not in rec
    assert srv.hits == 8  # 4 answers x (1 + 1 re-ask)
    assert [(rid, i) for rid, i, _ in rep.failures] == [("r1", 0), ("r1", 1), ("r1", 2), ("r1", 3)]
    assert "type=9" in rep.failures[0][2]


GOOD = '{"type": 5, "location": 4, "logic": 3}'
CHOICE = {"index": 0, "finish_reason": "stop"}


def _body(**fields):
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "judge-m",
                       **fields}).encode()


@pytest.mark.parametrize("body, why", [
    (b"<html>502 bad gateway</html>", "malformed reply"),  # not JSON at all
    (b'[{"type": 5}]', "malformed reply"),  # a JSON array
    (_body(choices=[CHOICE]), "the choice has no message"),
    (_body(choices=[]), "no choices"),
    (_body(choices=[{**CHOICE, "message": {"role": "assistant", "content": None}}]),
     "empty reply"),
])
def test_malformed_http_replies_are_failures_not_exceptions(server, body, why):
    # issue 19 bug 1: these used to raise out of _ask and the worker pool, losing every answer
    srv = server(default=("raw", body))
    rec = dict(REC)
    rep = score_records([rec], judge_for(srv, parse_retries=1), workers=2)
    assert rep.n_failed == 4 and "mle" not in rec
    assert all(why in reason for _, _, reason in rep.failures), rep.failures
    srv2 = server([("raw", body)], default=GOOD)  # a bad reply, then a good one: re-asked
    assert judge_for(srv2, parse_retries=1).score("Q?", "ref", "cand", {}) == MLEResult(5, 4, 3)


def test_an_exception_in_one_call_is_that_answers_failure():
    class Flaky(Judge):
        name = "flaky"

        def score(self, question, reference_answer, candidate, record):
            if candidate == "boom":
                raise RuntimeError("connection pool broke")
            return MLEResult(3, 3, 3)

    recs = [{"id": "a", "question": "Q?", "answers": ["x", "boom"]},
            {"id": "b", "question": "Q?", "answers": ["x", "y"]}]
    rep = score_records(recs, Flaky(), workers=2)
    assert rep.n_failed == 1 and rep.n_judged == 3 and recs[1]["mle"] == [[3, 3, 3]] * 2
    assert rep.failures == [("a", 1, "flaky judge raised RuntimeError: connection pool broke")]


def test_score_records_concurrent_dedup_and_keep(server):
    def reply(body):  # score depends on the candidate, so any order of requests is fine
        cand = body["messages"][1]["content"].rsplit("Candidate answer: ", 1)[1]
        t = 5 - ["best", "good", "poor", "worst"].index(cand.split()[0])
        return json.dumps({"type": t, "location": t, "logic": max(1, t - 1)})

    srv = server(default=reply)
    recs = [{"id": f"r{k}", "question": f"Q{k}?", "answers": ["best a", "good b", "poor c",
                                                              "worst d"]} for k in range(4)]
    recs[3]["question"] = recs[2]["question"]  # r3 asks exactly what r2 asks
    recs.append({"id": "done", "question": "Q?", "answers": ["a"] * 4, "mle": [[1, 1, 1]] * 4})
    rep = score_records(recs, judge_for(srv), workers=4)
    want = [[5, 5, 4], [4, 4, 3], [3, 3, 2], [2, 2, 1]]
    assert all(r["mle"] == want for r in recs[:4]) and recs[4]["mle"] == [[1, 1, 1]] * 4
    # no cache file: r3's prompts are still asked once (in-memory cache), r3 counts as cached
    assert (rep.n_judged, rep.n_cached, rep.n_failed, rep.n_kept) == (12, 4, 0, 1)
    assert srv.hits == 12


def test_score_records_dedup_with_cache(server, tmp_path):
    srv = server()
    recs = [{"id": f"r{k}", "question": "Same?", "answers": ["a", "b", "c", "d"]} for k in range(3)]
    rep = score_records(recs, judge_for(srv, tmp_path), workers=4)
    assert srv.hits == 4  # 3 records x 4 answers, 4 distinct prompts, each asked once
    assert (rep.n_judged, rep.n_cached) == (4, 8)


# ----------------------------------------------------------------------------- CLI

def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _qa(k, **extra):
    return {"id": f"s-{k}", "test_image": "t.png", "reference_image": None, "level": "standard",
            "group": "g", "question": f"Is there a scratch {k}?", "label": "yes",
            "answers": ["Yes. best", "Yes. ok", "No. bad", "No. worst"], **extra}


def test_cli_openai_writes_out_and_reports(server, tmp_path, monkeypatch, capsys):
    srv = server(["not json", "still not json", "nope"])  # first answer fails (1 + 2 re-asks)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = tmp_path / "d.jsonl"
    _write(data, [_qa(0), _qa(1)])
    before = data.read_text()
    argv = ["--data", str(data), "--judge", "openai", "--base-url", srv.url,
            "--model", "judge-m", "--workers", "1", "--max-retries", "0"]
    assert main(argv) == 1  # one answer failed -> non-zero
    out = capsys.readouterr().out
    assert "failed 1" in out and "record s-0 answer 0" in out and KEY not in out
    assert data.read_text() == before  # the input is never touched
    recs = [json.loads(line) for line in (tmp_path / "d.mle.jsonl").read_text().splitlines()]
    assert "mle" not in recs[0] and recs[1]["mle"] == [[5, 4, 3]] * 4
    cache = (tmp_path / "d.mle_cache.jsonl").read_text()
    assert KEY not in cache and len(cache.splitlines()) == 7
    # rerun on the same input: the 7 good answers come from the cache, the failed one is asked
    hits = srv.hits
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "judged 1, cached 7), failed 0" in out and srv.hits == hits + 1
    # rerun on the output in place: the scored record is kept, the other one is filled
    out_file = tmp_path / "d.mle.jsonl"
    (tmp_path / "d.mle_cache.jsonl").unlink()
    _write(out_file, recs)
    assert main(argv[:1] + [str(out_file)] + argv[2:] + ["--in-place"]) == 0
    assert "judged 4, cached 0), failed 0, kept 1" in capsys.readouterr().out
    assert all("mle" in json.loads(line) for line in out_file.read_text().splitlines())
    # --out equal to the input without --in-place is refused
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(data)])


def test_cli_oracle(tmp_path, capsys):
    pytest.importorskip("sage.data.oracle", reason="sage/data/oracle.py (helper synthad) absent")
    data = tmp_path / "d.jsonl"
    truth = {"anomalous": True, "defect": "scratch", "region": "top-left"}
    _write(data, [_qa(0, truth=truth)])
    assert main(["--data", str(data), "--judge", "oracle", "--in_place"]) == 0
    rec = json.loads(data.read_text())
    assert len(rec["mle"]) == 4 and all(1 <= s <= 5 for row in rec["mle"] for s in row)


def test_cli_rescore_in_place_keeps_the_earlier_score_on_failure(server, tmp_path, monkeypatch,
                                                                 capsys):
    srv = server(default=("raw", b"not json"))  # every new call fails
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = tmp_path / "d.jsonl"
    _write(data, [_qa(0, mle=[[2, 2, 2]] * 4), _qa(1)])
    assert main(["--data", str(data), "--judge", "openai", "--base_url", srv.url, "--rescore",
                 "--in_place", "--max_retries", "0", "--parse_retries", "0"]) == 1
    assert "1 kept their earlier score" in capsys.readouterr().out
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    assert recs[0]["mle"] == [[2, 2, 2]] * 4 and "mle" not in recs[1]


@pytest.mark.parametrize("argv, why", [
    (["--workers", "0"], "argument --workers: 0 must be >= 1"),
    (["--parse_retries", "-1"], "argument --parse_retries: -1 must be >= 0"),
    (["--timeout", "0"], "argument --timeout: 0 must be > 0"),
])
def test_cli_argument_errors(tmp_path, capsys, argv, why):
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "d.jsonl"), "--judge", "oracle", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {why}") and err.count("\n") == 1
