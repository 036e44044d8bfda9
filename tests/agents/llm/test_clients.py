"""Model clients: replay files, the OpenAI-compatible request formats on the wire, the embedded model (slow) and a
llama.cpp server (slow)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from support.procs import Procs, wait_until

from m2m.agents.llm.answer import Answer
from m2m.agents.llm.bench import bench_cases
from m2m.agents.llm.clients import ModelClientSpec, gemma_turns, load_replay, make_client
from m2m.agents.llm.decision import TppDecision, decide, decision_type, to_answer
from m2m.agents.llm.models import DEFAULT_MODEL, ensure_model, is_installed

SITUATION = next(c.situation for c in bench_cases() if c.name == "prostate/rectum-v70-fails")
ANSWER = {"action": "change", "tpp": "lambda_rectum", "direction": "raise", "rationale": "rectum V70Gy fails"}


def test_replay_from_a_file(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps([ANSWER, "not json"]))
    assert load_replay(path) == (json.dumps(ANSWER), "not json")
    outcome = asyncio.run(decide(make_client(ModelClientSpec("replay", replay_path=path)), SITUATION, "unguided"))
    assert outcome.valid and outcome.raw == to_answer(TppDecision(**ANSWER), SITUATION)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="array"):
        load_replay(tmp_path / "bad.json")


def test_gemma_turns_put_the_system_text_in_the_first_user_turn():
    pytest.importorskip("llama_cpp")
    result = gemma_turns([{"role": "system", "content": "RULES"}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}])
    assert result.prompt == ("<start_of_turn>user\nRULES\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
                             "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n")
    assert result.stop == ["<end_of_turn>"]


class _Recorder(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that records each request body and answers with :data:`ANSWER`."""

    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        reply = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps(ANSWER)}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    pytest.importorskip("openai")
    _Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("request_format", ["json_schema", "json_object_schema"])
def test_openai_request_formats_reach_the_server(recorder, request_format, monkeypatch):
    monkeypatch.setenv("M2M_TEST_KEY", "secret")
    spec = ModelClientSpec("openai", model="planner", base_url=recorder, api_key_env="M2M_TEST_KEY",
                           request_format=request_format)  # type: ignore[arg-type]
    outcome = asyncio.run(decide(make_client(spec), SITUATION, "unguided"))
    assert outcome.valid and outcome.raw == to_answer(TppDecision(**ANSWER), SITUATION)
    (body,) = _Recorder.bodies
    assert body["temperature"] == 0 and body["seed"] == 0 and body["max_tokens"] == 128
    schema = decision_type(tuple(SITUATION.tpps)).model_json_schema()
    fmt = body["response_format"]
    if request_format == "json_object_schema":
        assert fmt == {"type": "json_object", "schema": schema}
    else:
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"]["properties"]["tpp"]["enum"] == ["", *SITUATION.tpps]


def test_openai_needs_a_key_when_named(monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.delenv("M2M_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="M2M_ABSENT_KEY"):
        make_client(ModelClientSpec("openai", base_url="http://127.0.0.1:9/v1", api_key_env="M2M_ABSENT_KEY"))
    with pytest.raises(ValueError, match="base_url"):
        make_client(ModelClientSpec("openai"))


def _schema_conforming(outcome: Any) -> None:
    narrowed = decision_type(tuple(SITUATION.tpps))
    assert outcome.answers, outcome.error
    for answer in outcome.answers:
        narrowed.model_validate_json(answer)  # constrained decoding: every answer follows the schema


@pytest.mark.slow
def test_embedded_default_model_gives_a_valid_decision():
    pytest.importorskip("llama_cpp")
    if not is_installed(DEFAULT_MODEL):
        pytest.skip("the llm extra is not installed")
    client = make_client(ModelClientSpec("embedded"))
    try:
        outcome = asyncio.run(decide(client, SITUATION, "unguided"))
    finally:
        asyncio.run(client.close())
    _schema_conforming(outcome)
    assert outcome.valid, outcome.error
    assert isinstance(outcome.raw, Answer)
    assert outcome.raw.stop or all(c.tpp in SITUATION.tpps for c in outcome.raw.changes)


@pytest.mark.slow
def test_embedded_default_model_answers_in_the_default_quantile_form_from_the_menu():
    """The planner's default form, guided, on the shipped knowledge: the answer is one of the menu's points."""
    import dataclasses

    from m2m.agents.drl import DEFAULT_KNOWLEDGE
    from m2m.agents.drl.knowledge import load_knowledge
    from m2m.agents.llm.guard import quantile_menu
    from m2m.agents.planner import DEFAULT_FORM

    pytest.importorskip("llama_cpp")
    if not is_installed(DEFAULT_MODEL):
        pytest.skip("the llm extra is not installed")
    guided = dataclasses.replace(SITUATION, knowledge=load_knowledge(DEFAULT_KNOWLEDGE), knowledge_site="prostate")
    menu = quantile_menu(guided, "guided", guided.scenario.oar_names)
    client = make_client(ModelClientSpec("embedded"))
    try:
        outcome = asyncio.run(decide(client, guided, "guided", form=DEFAULT_FORM))
    finally:
        asyncio.run(client.close())
    assert outcome.valid and outcome.form == "quantile", outcome.error
    assert outcome.raw is not None and not outcome.raw.stop  # rectum V70Gy fails
    assert all(c.target in dict(menu[c.tpp]) for c in outcome.raw.changes)


@pytest.mark.slow
def test_embedded_client_serialises_concurrent_decisions():
    """Two decisions at once on one llama.cpp context queue instead of sharing it (the smallest model)."""
    pytest.importorskip("llama_cpp")
    if not is_installed("smollm2-135m"):
        pytest.skip("the llm-bench extra is not installed")
    client = make_client(ModelClientSpec("embedded", model="smollm2-135m", max_tokens=48))

    async def both() -> list[Any]:
        try:
            return list(await asyncio.gather(decide(client, SITUATION, "unguided"),
                                             decide(client, SITUATION, "guided")))
        finally:
            await client.close()

    for outcome in asyncio.run(both()):
        assert "Error" not in outcome.error, outcome.error
        assert outcome.answers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_llama_cpp_server_through_the_openai_client(procs: Procs):
    pytest.importorskip("openai")
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    # The smallest candidate that follows the decision format: smollm2-135m fills the schema (the grammar sees to
    # that) but answers "change" with an empty tpp.
    smallest = "qwen-0.5b"
    if not is_installed(smallest):
        pytest.skip("the llm-bench extra is not installed")
    port = _free_port()
    server = procs.spawn("-m", "llama_cpp.server", "--model", str(ensure_model(smallest)), "--host", "127.0.0.1",
                         "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--model_alias", smallest,
                         name="llama-server")
    base_url = f"http://127.0.0.1:{port}/v1"

    def listening() -> bool:  # the server loads the model before it listens
        if server.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {server.returncode}:\n{procs.dump_logs()}")
        try:
            urllib.request.urlopen(f"{base_url}/models", timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(listening, f"llama_cpp.server answers on {base_url}", timeout=300, step=0.5)
    spec = ModelClientSpec("openai", model=smallest, base_url=base_url, request_format="json_object_schema")
    outcome = asyncio.run(decide(make_client(spec), SITUATION, "unguided"))
    _schema_conforming(outcome)
    assert outcome.valid, outcome.error
    assert isinstance(outcome.raw, Answer)
