"""The OpenAI-compatible client against a loopback stub that speaks llama-cpp-python's protocol.

The stub answers ``/v1/completions`` (legacy ``top_logprobs`` dicts), ``/v1/chat/completions``
(``content[].top_logprobs`` lists) and ``/extras/tokenize``/``detokenize``, ignores ``n`` like
llama.cpp, and records every request. An opt-in test runs the same client against a real
``llama_cpp.server`` (set ``PROMPTSWEEP_LLAMA_SERVER`` to its base URL).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from methods.lm import GENERATE, Request, TokenPrompt
from backends.openai_compat import EndpointError, OpenAICompatLM

KEY = "sk-test-0123456789-do-not-log"
LABELS = {" positive": -1.2, " negative": -2.0, " neutral": -3.0, "Positive": -1.0}  # total mass < 1
WORDS: dict[str, int] = {}


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def top_for(prompt: str) -> dict[str, float]:
    """The stub's next-token top logprobs after ``prompt`` (depends on the prompt, deterministic)."""
    shift = _unit(prompt)
    return {tok: lp - shift for tok, lp in LABELS.items()}


def tokens_of(text: str) -> list[int]:
    """Stub tokenizer: one token per space-led word (BOS=1 first, as llama-cpp-python adds)."""
    pieces = [p for p in text.replace(" ", "\0 ").split("\0") if p]
    return [1] + [WORDS.setdefault(p, len(WORDS) + 2) for p in pieces]


class Stub(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        self.connection.settimeout(5)  # bounded: a stuck client cannot hang the test
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": "Invalid API key"})
        if body.get("prompt") == "echo my headers":  # a server that leaks what it was sent
            return self._send(400, {"error": f"bad request with {self.headers.get('Authorization')}"})
        if body.get("prompt") == "flaky" and not server.failed:
            server.failed = True
            return self._send(503, {"error": "busy"})
        routes = {"/v1/completions": self._completion, "/v1/chat/completions": self._chat,
                  "/extras/tokenize": self._tokenize, "/extras/detokenize": self._detokenize}
        self._send(200, routes[self.path](body))

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _completion(self, body: dict) -> dict:
        assert body["max_tokens"] >= 1  # 0 would mean "unlimited" on llama.cpp
        if body.get("logprobs"):
            top = dict(sorted(top_for(body["prompt"]).items(), key=lambda kv: -kv[1])[: body["logprobs"]])
            first = max(top, key=top.get)
            lp = {"tokens": [first], "token_logprobs": [top[first]], "top_logprobs": [top], "text_offset": [0]}
            return {"choices": [{"text": first, "index": 0, "logprobs": lp, "finish_reason": "length"}]}
        return {"choices": [{"text": f"sample {body.get('seed')} t={body['temperature']}\nrest", "index": 0}]}

    def _chat(self, body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        if body.get("logprobs"):
            top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top_for(prompt).items()]
            top = sorted(top, key=lambda t: -t["logprob"])[: body["top_logprobs"]]
            content = [{**top[0], "top_logprobs": top}]
            return {"choices": [{"message": {"role": "assistant", "content": top[0]["token"]}, "logprobs": {"content": content}}]}
        return {"choices": [{"message": {"role": "assistant", "content": f"chat {body.get('seed')}"}}]}

    def _tokenize(self, body: dict) -> dict:
        return {"tokens": tokens_of(body["input"])}

    def _detokenize(self, body: dict) -> dict:
        words = {i: w for w, i in WORDS.items()}
        return {"text": "".join(words.get(i, "") for i in body["tokens"])}


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    srv.seen, srv.failed = [], False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("PSW_TEST_KEY", KEY)


def client(server, **kwargs) -> OpenAICompatLM:
    host, port = server.server_address
    return OpenAICompatLM(f"http://{host}:{port}/v1", model="stub", api_key_env="PSW_TEST_KEY", timeout=5, retries=1, **kwargs)


def test_n_samples_are_n_seeded_requests_with_the_key(server):
    lm = client(server)
    out = lm.generate(["a", "b"], max_new_tokens=5, temperature=0.7, n=3, seed=11, stop=("\n",))
    completions = [s for s in server.seen if s["path"] == "/v1/completions"]
    assert len(completions) == 6 and all(s["auth"] == f"Bearer {KEY}" for s in completions)
    assert all(s["body"]["max_tokens"] == 5 and s["body"]["stop"] == ["\n"] and "n" not in s["body"] for s in completions)
    seeds = {s["body"]["seed"] for s in completions}
    assert len(seeds) == 6  # every sample has its own stream: llama.cpp ignores n
    assert [len(row) for row in out] == [3, 3] and len({s for row in out for s in row}) == 6
    assert all(s.startswith("sample ") and "\n" not in s for row in out for s in row)  # cut at the stop
    again = client(server).generate(["a", "b"], max_new_tokens=5, temperature=0.7, n=3, seed=11, stop=("\n",))
    assert again == out  # same seed, same samples


def test_greedy_asks_once_and_zero_tokens_is_refused(server):
    lm = client(server)
    out = lm.generate(["a"], max_new_tokens=4, temperature=0.0, n=3, seed=0)
    assert len(server.seen) == 1 and out == [[out[0][0]] * 3]
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        lm.generate(["a"], max_new_tokens=0, temperature=0.0)
    assert len(server.seen) == 1


def test_loglikelihood_reads_the_first_position_top_logprobs(server):
    lm = client(server, top_logprobs=3)
    requests = [(f"Review {i}\nSentiment:", label) for i in range(3) for label in (" positive", " negative", " meh")]
    out = lm.loglikelihood(Request.batch(requests))
    calls = [s["body"] for s in server.seen]
    assert len(calls) == 3  # one request per distinct context, not per label
    assert all(c["max_tokens"] == 1 and c["logprobs"] == 3 and not c.get("echo") for c in calls)
    for (context, label), got in zip(requests, out):
        top = dict(sorted(top_for(context).items(), key=lambda kv: -kv[1])[:3])
        want = top[label] if label in top else min(min(top.values()), math.log(1 - sum(math.exp(v) for v in top.values())))
        assert got == pytest.approx(want)
    assert out[1] >= out[2] and np.isfinite(out).all()  # a label outside the top-k: at most the k-th


def test_chat_endpoint_sends_messages_and_reads_chat_logprobs(server):
    lm = client(server, chat=True, top_logprobs=4)
    assert lm.generate(["write"], max_new_tokens=3, temperature=0.5, seed=2) == [["chat 2"]]
    (score,) = lm.loglikelihood(Request.batch([("Is it good?", " Positive")]))  # a reply starts a turn: no leading space
    sent = server.seen[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["messages"] == [{"role": "user", "content": "Is it good?"}]
    assert sent["body"]["logprobs"] is True and sent["body"]["top_logprobs"] == 4
    assert score == pytest.approx(top_for("Is it good?")["Positive"])


def test_multi_token_labels_fail_loudly_unless_first_token_is_accepted(server):
    strict = client(server, tokenizer_path="/extras/tokenize")
    assert strict.tokenize(" very positive") == tokens_of(" very positive")[1:]  # the server's BOS dropped
    with pytest.raises(ValueError, match="2 tokens"):
        strict.loglikelihood(Request.batch([("ctx", " positive mood")]))
    lenient = client(server, tokenizer_path="/extras/tokenize", multi_token="first")
    (score,) = lenient.loglikelihood(Request.batch([("ctx", " positive mood")]))
    assert score == pytest.approx(top_for("ctx")[" positive"])


def test_the_key_never_leaves_the_request_header(server, capsys):
    lm = client(server)
    with pytest.raises(EndpointError) as err:
        lm.generate(["echo my headers"], max_new_tokens=2, temperature=0.0)
    assert "HTTP 400" in str(err.value) and KEY not in str(err.value)
    outputs = [lm.generate(["x"], max_new_tokens=2, temperature=0.0), lm.loglikelihood(Request.batch([("x", " positive")])).tolist()]
    captured = capsys.readouterr()
    assert KEY not in repr(vars(lm)) + repr(lm) + json.dumps(outputs) + captured.out + captured.err
    with pytest.raises(ValueError) as err:
        OpenAICompatLM("http://127.0.0.1:1", api_key_env=KEY)  # the key pasted where its variable's name goes
    assert KEY not in str(err.value)


def test_a_missing_key_is_a_clear_401_and_transient_errors_are_retried(server, monkeypatch):
    ((text,),) = client(server).generate(["flaky"], max_new_tokens=2, temperature=0.0)
    assert text.startswith("sample ")
    assert sum(s["body"].get("prompt") == "flaky" for s in server.seen) == 2  # 503, then retried
    monkeypatch.delenv("PSW_TEST_KEY")
    with pytest.raises(EndpointError, match=r"HTTP 401 \(is \$PSW_TEST_KEY set\?\)"):
        client(server).generate(["x"], max_new_tokens=2, temperature=0.0)
    assert server.seen[-1]["auth"] is None


def test_declares_generation_only_and_refuses_spliced_prompts(server):
    lm = client(server)
    assert lm.capabilities == {GENERATE}
    with pytest.raises(TypeError, match="text only"):
        lm.loglikelihood(Request.batch([("a", " b")], TokenPrompt((1,))))
    assert lm.decode(lm.tokenize("héllo")) == "héllo" and len(lm.tokenize("héllo")) == 6  # bytes: an upper bound
    assert server.seen == []


def test_the_model_yaml_builds_the_client():
    import hydra.utils
    from omegaconf import OmegaConf

    from pipelines.plan import check_arguments, redact

    cfg = OmegaConf.to_container(OmegaConf.load("conf/model/openai.yaml"))
    target = cfg.pop("_target_")
    check_arguments(target, cfg)
    lm = hydra.utils.instantiate({"_target_": target, **cfg, "base_url": "http://127.0.0.1:9/v1"}, _convert_="all")
    assert isinstance(lm, OpenAICompatLM) and lm.base_url == "http://127.0.0.1:9"
    assert redact(cfg)["api_key_env"] == "OPENAI_API_KEY"  # a variable's name is not a secret


@pytest.mark.server
@pytest.mark.skipif(not os.environ.get("PROMPTSWEEP_LLAMA_SERVER"), reason="set PROMPTSWEEP_LLAMA_SERVER to a llama_cpp.server URL")
def test_against_a_real_llama_cpp_server():
    """``python -m llama_cpp.server --model <default model>.gguf --port 8000`` then
    ``PROMPTSWEEP_LLAMA_SERVER=http://127.0.0.1:8000 pytest -m server``."""
    lm = OpenAICompatLM(os.environ["PROMPTSWEEP_LLAMA_SERVER"], tokenizer_path="/extras/tokenize", timeout=120)
    out = lm.generate(["The capital of France is"], max_new_tokens=8, temperature=0.8, n=3, seed=3)
    assert len(out[0]) == 3 and len(set(out[0])) > 1  # n honoured by n requests
    assert lm.generate(["The capital of France is"], max_new_tokens=8, temperature=0.8, n=3, seed=3) == out
    greedy = lm.generate(["The capital of France is"], max_new_tokens=4, temperature=0.0)
    assert "Paris" in greedy[0][0]
    context = "Review: a wonderful, moving film.\nSentiment (positive or negative):"
    pos, neg = lm.loglikelihood(Request.batch([(context, " positive"), (context, " negative")]))
    assert np.isfinite([pos, neg]).all() and pos > neg and pos < 0
    assert lm.tokenize(" positive") and lm.decode(lm.tokenize(" positive")) == " positive"
