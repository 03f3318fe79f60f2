"""MLE judges (paper §3.3, Eq. 3): sub-scores type / location / logic, 1-5 each, per answer.

A judge scores one candidate answer to a question against the expert reference answer:

    judge.score(question, reference_answer, candidate, record) -> MLEResult | MLEFailure

- `OracleJudge`: SynthAD's deterministic judge (`sage.data.oracle.oracle_scores`), which reads
  the record's structured `truth` and `label`; no network.
- `OpenAIJudge`: an LLM judge (the paper's Γ_LLM, GPT-4o) through any OpenAI-compatible
  endpoint. Prompt: SYSTEM_PROMPT + `build_messages`; reply: JSON {"type", "location",
  "logic"} validated by `parse_reply`. Unusable replies (also a malformed HTTP body: not JSON,
  a JSON array, a choice without a message) are re-asked (bounded) and then returned as
  `MLEFailure`, never replaced by a default score; no failure of one call raises. Rate
  limits, 5xx and timeouts are retried with backoff by the openai client itself. Successful
  scores are appended to a JSONL cache keyed by sha256(model, messages), so an interrupted
  run resumes without asking anything twice. The API key is never logged or written.

`score_records` fills each record's `mle` field ([[t, l, g]] x L, docs/design.md §6); the command
line is `python -m sage.tools.mle`.

    rep = score_records(records, OracleJudge())
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

KEYS = ("type", "location", "logic")  # JSON keys of a judge reply, in Eq. 3 order


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class MLEResult:
    """Judge sub-scores of one answer, integers 1..5 (Eq. 3: S = (type + loc + logic) / 3)."""

    type: int
    loc: int
    logic: int
    cached: bool = field(default=False, compare=False)  # served from the cache, not asked

    def as_list(self) -> list[int]:
        """[t, l, g] as stored in a record's `mle` field."""
        return [self.type, self.loc, self.logic]


@dataclass(frozen=True)
class MLEFailure:
    """A judge that gave no usable score: why, and the last raw reply if there was one."""

    reason: str
    raw: str | None = None


def check_scores(values: Any, where: str) -> MLEResult:
    """Validate (type, location, logic): a dict with KEYS or a sequence of 3, ints in 1..5.
    Raises ValueError naming `where` and the offending key."""
    if isinstance(values, MLEResult):
        values = values.as_list()
    if isinstance(values, dict):
        missing = [k for k in KEYS if k not in values]
        if missing:
            raise ValueError(f"{where}: key(s) {missing} missing; expected {list(KEYS)}")
        values = [values[k] for k in KEYS]
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{where}: expected 3 scores (type, location, logic), got {values!r}")
    for k, v in zip(KEYS, values):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 5:
            raise ValueError(f"{where}: {k}={v!r} is not an integer in 1..5")
    return MLEResult(*values)


class Judge:
    """Interface: score one candidate answer. Implementations must be thread-safe."""

    name = "judge"

    def score(self, question: str, reference_answer: str, candidate: str,
              record: dict) -> MLEResult | MLEFailure:
        raise NotImplementedError


# ----------------------------------------------------------------------------- oracle judge

class OracleJudge(Judge):
    """SynthAD's deterministic judge: `oracle_scores(answer, truth, label, question)` reads the
    record's structured `truth` and `label` (the reference answer is not needed)."""

    name = "oracle"

    def __init__(self) -> None:
        from sage.data.oracle import oracle_scores  # lazy: only SynthAD scoring needs it
        self._oracle = oracle_scores

    def score(self, question: str, reference_answer: str, candidate: str,
              record: dict) -> MLEResult | MLEFailure:
        try:
            out = self._oracle(candidate, record.get("truth"), record.get("label"), question)
        except (KeyError, ValueError) as e:  # a record the oracle cannot judge
            return MLEFailure(f"oracle: {type(e).__name__}: {e}")
        return check_scores(out, "sage.data.oracle.oracle_scores")  # a bad value is a bug: raise


# ----------------------------------------------------------------------------- OpenAI judge

SYSTEM_PROMPT = """\
You are an expert in industrial visual inspection. You grade a candidate answer to a question \
about an inspected product image. You do not see the image: you see the question, what is \
known about the sample, and an expert reference answer. Grade the candidate on three \
criteria, each an integer from 1 (wrong or missing) to 5 (fully correct and complete):
- type: the decision (anomalous or normal) and the defect type are identified correctly;
- location: the defect is located correctly (or the absence of a defect is stated correctly);
- logic: the reasoning about cause and consequence is sound and agrees with the reference.
Reply with only a JSON object: {"type": <1-5>, "location": <1-5>, "logic": <1-5>}"""

REPAIR_PROMPT = ("Your reply could not be used ({reason}). Reply with only the JSON object "
                 '{{"type": <1-5>, "location": <1-5>, "logic": <1-5>}}, integers from 1 to 5.')


def build_messages(question: str, reference_answer: str, candidate: str,
                   record: dict) -> list[dict]:
    """The judge prompt: system rubric + one user turn with the question, the ground-truth
    decision and structured truth when the record has them, the reference and the candidate."""
    lines = [f"Question: {question.strip()}"]
    if record.get("label"):
        lines.append(f"Ground-truth decision: {record['label']}")
    if record.get("truth"):
        lines.append(f"Known facts about the sample: {json.dumps(record['truth'], sort_keys=True)}")
    lines.append(f"Expert reference answer: {reference_answer.strip()}")
    lines.append(f"Candidate answer: {candidate.strip()}")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n".join(lines)}]


def parse_reply(text: str | None) -> MLEResult:
    """A judge reply -> MLEResult. Accepts the JSON object alone or inside a ``` fence;
    raises ValueError (why) on no JSON, malformed JSON, a missing key or a value outside 1..5."""
    if not text or not text.strip():
        raise ValueError("empty reply")
    m = re.search(r"\{.*\}", text, re.DOTALL)  # first '{' to last '}'
    if m is None:
        raise ValueError(f"no JSON object in the reply {text[:80]!r}")
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg}) in the reply {text[:80]!r}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {obj!r}")
    return check_scores(obj, "judge reply")


def cache_key(model: str, messages: list[dict]) -> str:
    """sha256 of (model, prompt messages): the cache key of one judge request."""
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False


class JudgeCache:
    """Successful scores by cache key, in memory and (path given) in an append-only JSONL
    {"key", "model", "type", "location", "logic"}, one line per result, flushed as it arrives.
    Failures are not cached (a rerun asks again)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._scores: dict[str, MLEResult] = {}
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if not raw.endswith(b"\n") and not _parses(raw[cut:]):
            # a last line cut short by an interrupted run: drop it (it is asked again)
            print(f"warning: {self.path}: dropping an incomplete last line", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            raw = raw[:cut]
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self._scores[row["key"]] = check_scores(row, f"{self.path}:{lineno}")
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{self.path}:{lineno}: bad cache line ({e})") from None

    def get(self, key: str) -> MLEResult | None:
        with self._lock:
            return self._scores.get(key)

    def put(self, key: str, model: str, result: MLEResult) -> None:
        row = {"key": key, "model": model, **dict(zip(KEYS, result.as_list()))}
        with self._lock:
            self._scores[key] = result
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+", encoding="utf-8") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # start on a fresh line after a cut-short last line
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":
                        f.write("\n")
                f.write(json.dumps(row) + "\n")
                f.flush()


class OpenAIJudge(Judge):
    """The paper's LLM judge through an OpenAI-compatible chat completions endpoint.

    model / base_url / api_key: arguments, else OPENAI_BASE_URL / OPENAI_API_KEY
    (a local server still needs some non-empty key). max_retries, timeout (s): the openai
    client's own retries with exponential backoff (honouring retry-after) on 429, 5xx,
    connection errors and timeouts. parse_retries: how many times an unusable reply is
    re-asked, with REPAIR_PROMPT, before the answer is reported as failed.
    cache: JSONL path of the JudgeCache (None: in memory only).
    json_mode: also send response_format {"type": "json_object"} (not every server has it).
    """

    name = "openai"

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None,
                 api_key: str | None = None, cache: str | Path | None = None,
                 max_retries: int = 5, timeout: float = 60.0, parse_retries: int = 2,
                 json_mode: bool = False) -> None:
        import openai  # lazy: only the LLM judge needs it

        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise ValueError("OpenAIJudge: no API key; set OPENAI_API_KEY (any non-empty "
                             "value for a local server that ignores it)")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.client = openai.OpenAI(api_key=api_key, base_url=self.base_url,
                                    max_retries=max_retries, timeout=timeout)
        self._api_error = openai.APIError  # base of status, connection and timeout errors
        self.parse_retries = parse_retries
        self.json_mode = json_mode
        self.cache = JudgeCache(cache)
        self._key_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def score(self, question: str, reference_answer: str, candidate: str,
              record: dict) -> MLEResult | MLEFailure:
        messages = build_messages(question, reference_answer, candidate, record)
        key = cache_key(self.model, messages)
        with self._locks_lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # the same prompt from two threads is asked once
            hit = self.cache.get(key)
            if hit is not None:
                return MLEResult(*hit.as_list(), cached=True)
            result = self._ask(messages)
            if isinstance(result, MLEResult):
                self.cache.put(key, self.model, result)
            return result

    def _ask(self, messages: list[dict]) -> MLEResult | MLEFailure:
        """One request, plus up to parse_retries re-asks for unusable replies (a repair turn
        when the model wrote something unusable); never raises."""
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        conversation, reason, text = list(messages), "", None
        for _ in range(1 + self.parse_retries):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=conversation, temperature=0.0, **extra)
            except self._api_error as e:  # the client has already retried what is retryable
                return MLEFailure(f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001  e.g. a 200 reply whose body is not JSON
                reason, text = f"malformed reply ({type(e).__name__}: {e})", None
                continue
            try:
                text = reply_text(reply)
            except ValueError as e:  # the HTTP reply itself is malformed: ask again as it was
                reason, text = str(e), None
                continue
            try:
                return parse_reply(text)
            except ValueError as e:
                reason = str(e)
                conversation = messages + [{"role": "assistant", "content": text or ""},
                                           {"role": "user",
                                            "content": REPAIR_PROMPT.format(reason=reason)}]
        return MLEFailure(f"no usable reply after {1 + self.parse_retries} attempt(s): {reason}",
                          raw=text)


def reply_text(reply: Any) -> str | None:
    """The assistant text of a chat completion; ValueError (what is wrong) when the reply is
    not one: a list or str body, no choices, a choice without `message`."""
    choices = getattr(reply, "choices", None)
    if choices is None and isinstance(reply, dict):  # a body the client did not parse
        choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"malformed reply: no choices in {str(reply)[:80]!r}")
    choice = choices[0]
    message = (choice.get("message") if isinstance(choice, dict)
               else getattr(choice, "message", None))
    if message is None:
        raise ValueError("malformed reply: the choice has no message")
    content = (message.get("content") if isinstance(message, dict)
               else getattr(message, "content", None))
    if content is not None and not isinstance(content, str):
        raise ValueError(f"malformed reply: content is {type(content).__name__}, not text")
    return content


# ----------------------------------------------------------------------------- scoring records

@dataclass
class ScoreReport:
    """What score_records did, counted per answer (kept: records that already had `mle`)."""

    n_judged: int = 0  # asked the judge now
    n_cached: int = 0  # served from the cache
    n_failed: int = 0
    n_kept: int = 0  # records left as they were (already scored, rescore=False)
    n_kept_old: int = 0  # rescored records whose new scoring failed: earlier `mle` kept
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (record id, answer, why)


def _score_one(judge: Judge, item: tuple[str, str, str, dict]) -> MLEResult | MLEFailure:
    """judge.score, with any exception of one call recorded as that answer's failure."""
    try:
        return judge.score(*item)
    except Exception as e:  # noqa: BLE001  one bad call must not lose every other answer
        return MLEFailure(f"{judge.name} judge raised {type(e).__name__}: {e}")


def score_many(judge: Judge, items: list[tuple[str, str, str, dict]], workers: int = 8,
               progress: Callable[[int, int], None] | None = None
               ) -> list[MLEResult | MLEFailure]:
    """judge.score over (question, reference_answer, candidate, record) items, `workers` at a
    time -> results in item order (an exception in a call is that item's MLEFailure).
    progress(done, total) is called after each item."""
    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(lambda it: _score_one(judge, it), items):
            out.append(res)
            if progress is not None:
                progress(len(out), len(items))
    return out


def score_records(records: list[dict], judge: Judge, workers: int = 8, rescore: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> ScoreReport:
    """Fill each record's `mle` with [[type, location, logic]] per answer, in place.

    The reference answer is the expert's best, answers[0]. A record gets `mle` only when every
    one of its answers was scored; otherwise it keeps the `mle` it had (rescore) or has none,
    and its failures are in the report.
    workers, progress: as score_many.
    """
    rep = ScoreReport()
    jobs = []  # (record index, answer index)
    for r, rec in enumerate(records):
        if rec.get("mle") is not None and not rescore:
            rep.n_kept += 1
            continue
        jobs += [(r, i) for i in range(len(rec["answers"]))]

    items = [(records[r]["question"], records[r]["answers"][0], records[r]["answers"][i],
              records[r]) for r, i in jobs]
    results = dict(zip(jobs, score_many(judge, items, workers, progress)))
    for r, rec in enumerate(records):
        if (r, 0) not in results:
            continue
        row = [results[(r, i)] for i in range(len(rec["answers"]))]
        for i, res in enumerate(row):
            if isinstance(res, MLEFailure):
                rep.n_failed += 1
                rep.failures.append((rec["id"], i, res.reason))
            elif res.cached:
                rep.n_cached += 1
            else:
                rep.n_judged += 1
        if all(isinstance(res, MLEResult) for res in row):
            rec["mle"] = [res.as_list() for res in row]
        elif rec.get("mle") is not None:
            rep.n_kept_old += 1  # a failed rescore never removes the earlier score
    return rep


if __name__ == "__main__":  # a library module; its command line is a tool
    raise SystemExit("error: the command line is `python -m sage.tools.mle` "
                     "(--help for usage)")
