"""Chat-completion clients for the LLM planner: an embedded llama.cpp model, an OpenAI-compatible server, or replay.

* ``embedded``: autogen-ext's ``LlamaCppChatCompletionClient`` on a verified GGUF of :mod:`m2m.agents.llm.models`.
  That client turns a pydantic ``json_output`` into llama.cpp's ``response_format={"type": "json_object",
  "schema": …}``, which llama.cpp compiles into a grammar: decoding is constrained to the decision schema. The
  subclass here only adds fixed sampling arguments (temperature 0, seed, a token cap, no repeat penalty, which
  would push greedy decoding off the JSON it must repeat), serialises requests (one llama.cpp context serves one
  request at a time) and the prefix-reuse switch. Prefix reuse: llama.cpp keeps the KV cache of the longest token
  prefix shared with the previous request, and every decision starts with the same
  :data:`~m2m.agents.llm.situation.SYSTEM_PROMPT` (one text for every form and mode), so only the user prompt is
  evaluated — from the first decision on, since a planner fills that cache while it loads the model (:func:`warm_up`)
  (a ``LlamaRAMCache`` would add a state copy per request and only help prompts that alternate between different
  prefixes, which the planner's never do); ``reuse_prefix=False`` clears the context before each request (for
  measurements).
* ``openai``: autogen-ext's ``OpenAIChatCompletionClient`` against ``base_url``. The structured-output request is
  selectable: ``"json_schema"`` (OpenAI, vLLM: ``response_format={"type": "json_schema", …}``, strict) or
  ``"json_object_schema"`` (``llama_cpp.server``, which takes ``{"type": "json_object", "schema": …}`` and ignores
  the ``json_schema`` form).
* ``replay``: autogen-ext's ``ReplayChatCompletionClient`` fed with recorded answers (session replay, tests);
  ``replay_delay_s`` makes each answer take that long, spent in a worker thread as the embedded model spends its
  time (so cancelling a decision behaves as it does with the real model: the await returns, the thread runs on).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autogen_core import CancellationToken
from autogen_core.models import ChatCompletionClient, CreateResult, LLMMessage, ModelFamily, ModelInfo
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from m2m.agents.llm.models import DEFAULT_MODEL, REGISTRY, ensure_model

if TYPE_CHECKING:
    from llama_cpp.llama_chat_format import ChatFormatterResponse

ClientKind = Literal["embedded", "openai", "replay"]
RequestFormat = Literal["json_schema", "json_object_schema"]

#: What the planner's clients can do: JSON and structured output, no tools, no images.
PLANNER_MODEL_INFO = ModelInfo(
    vision=False, function_calling=False, json_output=True, structured_output=True, family=ModelFamily.UNKNOWN
)


@dataclass(frozen=True)
class ModelClientSpec:
    """How to reach a model.

    ``model``: a :data:`~m2m.agents.llm.models.REGISTRY` name (embedded) or the server's model name (openai).
    ``base_url`` and ``api_key_env`` (the name of the environment variable holding the key; when unset the client
    sends the fixed key "unused", because local servers check none but the OpenAI client requires one) for openai;
    ``request_format`` selects its structured-output request.
    ``replay_path`` (a JSON array of answers, each a string or an object) or ``replay_answers`` for replay, and
    ``replay_delay_s`` (seconds per answer, spent in a worker thread).
    ``n_ctx`` (tokens), ``threads`` (CPU threads), ``reuse_prefix`` and ``model_dir`` (default: the models cache)
    for embedded; ``seed``, ``temperature`` and ``max_tokens`` (answer cap, tokens) for embedded and openai.
    """

    kind: ClientKind
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key_env: str | None = None
    request_format: RequestFormat = "json_schema"
    replay_path: Path | None = None
    replay_answers: tuple[str, ...] = ()
    replay_delay_s: float = 0.0
    n_ctx: int = 4096
    seed: int = 0
    temperature: float = 0.0
    max_tokens: int = 128
    threads: int = 2
    reuse_prefix: bool = True
    model_dir: Path | None = None


def gemma_turns(messages: Sequence[Mapping[str, Any]], **_: Any) -> ChatFormatterResponse:
    """Gemma's turn format with the system text opening the first user turn (Gemma has no system role; llama.cpp's
    own ``"gemma"`` format drops it, and the base model's GGUF carries no chat template)."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse

    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system")
    turns: list[str] = []
    for m in messages:
        if m["role"] == "system":
            continue
        role = "model" if m["role"] == "assistant" else "user"
        text = f"{system}\n\n{m['content']}" if system and not turns else str(m["content"])
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    return ChatFormatterResponse(prompt="".join(turns) + "<start_of_turn>model\n", stop=["<end_of_turn>"])


def _embedded(spec: ModelClientSpec) -> ChatCompletionClient:
    from autogen_ext.models.llama_cpp import LlamaCppChatCompletionClient
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

    model = REGISTRY[spec.model]
    sampling = {"temperature": spec.temperature, "seed": spec.seed, "max_tokens": spec.max_tokens,
                "repeat_penalty": 1.0}

    class EmbeddedClient(LlamaCppChatCompletionClient):
        """Adds fixed sampling arguments, the prefix-reuse switch and one request at a time (module docstring)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            lock = threading.Lock()
            complete = self.llm.create_chat_completion

            def serialised(**request: Any) -> Any:
                # One llama.cpp context serves one request at a time: the base client runs each request in an
                # executor thread, so concurrent decisions would otherwise share the context. They queue here,
                # off the event loop.
                with lock:
                    if not spec.reuse_prefix:
                        self.llm.reset()
                    return complete(**request)

            self.llm.create_chat_completion = serialised  # type: ignore[method-assign,assignment]
            self._serialised = serialised

        def warm(self, system_text: str) -> float:
            """Evaluate ``system_text`` as the system message once now (seconds taken), so that the KV cache of
            that prefix is ready for the first decision: a planner does it while loading its model."""
            started = time.perf_counter()
            self._serialised(messages=[{"role": "system", "content": system_text}, {"role": "user", "content": "."}],
                             max_tokens=1, temperature=0.0)
            return time.perf_counter() - started

        async def create(
            self,
            messages: Sequence[LLMMessage],
            *,
            tools: Sequence[Tool | ToolSchema] = (),
            tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
            json_output: bool | type[BaseModel] | None = None,
            extra_create_args: Mapping[str, Any] = {},
            cancellation_token: CancellationToken | None = None,
        ) -> CreateResult:
            return await super().create(messages, tools=tools, tool_choice=tool_choice, json_output=json_output,
                                        extra_create_args={**sampling, **extra_create_args},
                                        cancellation_token=cancellation_token)

    handler = chat_formatter_to_chat_completion_handler(gemma_turns) if model.chat_format == "gemma-turns" else None
    return EmbeddedClient(
        model_info=PLANNER_MODEL_INFO,
        model_path=str(ensure_model(model, spec.model_dir)),
        n_ctx=spec.n_ctx,
        n_threads=spec.threads,
        n_threads_batch=spec.threads,
        seed=spec.seed,
        chat_handler=handler,
        verbose=False,
    )


def _openai(spec: ModelClientSpec) -> ChatCompletionClient:
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    if spec.base_url is None:
        raise ValueError("an openai client needs base_url")
    api_key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else "unused"
    if not api_key:
        raise ValueError(f"environment variable {spec.api_key_env} (the API key) is empty or unset")
    schema_in_json_object = spec.request_format == "json_object_schema"

    class OpenAICompatibleClient(OpenAIChatCompletionClient):
        """Sends a pydantic ``json_output`` as ``{"type": "json_object", "schema": …}`` when so configured."""

        async def create(
            self,
            messages: Sequence[LLMMessage],
            *,
            tools: Sequence[Tool | ToolSchema] = (),
            tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
            json_output: bool | type[BaseModel] | None = None,
            extra_create_args: Mapping[str, Any] = {},
            cancellation_token: CancellationToken | None = None,
        ) -> CreateResult:
            extra = dict(extra_create_args)
            if schema_in_json_object and isinstance(json_output, type) and issubclass(json_output, BaseModel):
                extra["response_format"] = {"type": "json_object", "schema": json_output.model_json_schema()}
                json_output = None
            return await super().create(messages, tools=tools, tool_choice=tool_choice, json_output=json_output,
                                        extra_create_args=extra, cancellation_token=cancellation_token)

    return OpenAICompatibleClient(
        model=spec.model,
        base_url=spec.base_url,
        api_key=api_key,
        model_info=PLANNER_MODEL_INFO,
        temperature=spec.temperature,
        seed=spec.seed,
        max_tokens=spec.max_tokens,
    )


def warm_up(client: ChatCompletionClient) -> float:
    """Fill an embedded client's KV cache with the planner's fixed system text
    (:data:`~m2m.agents.llm.situation.SYSTEM_PROMPT`; seconds taken, 0 for other clients, whose cache, if any, is
    the server's)."""
    from m2m.agents.llm.situation import SYSTEM_PROMPT

    warm = getattr(client, "warm", None)
    return float(warm(SYSTEM_PROMPT)) if callable(warm) else 0.0


def load_replay(path: Path) -> tuple[str, ...]:
    """Recorded answers from a JSON array (strings as they are, objects serialised as JSON)."""
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array of answers")
    return tuple(item if isinstance(item, str) else json.dumps(item) for item in items)


def make_client(spec: ModelClientSpec) -> ChatCompletionClient:
    """The client ``spec`` describes (see the module docstring)."""
    if spec.kind == "embedded":
        return _embedded(spec)
    if spec.kind == "openai":
        return _openai(spec)
    if spec.kind == "replay":
        from autogen_ext.models.replay import ReplayChatCompletionClient

        answers = load_replay(spec.replay_path) if spec.replay_path is not None else spec.replay_answers
        if spec.replay_delay_s <= 0:
            return ReplayChatCompletionClient(list(answers), model_info=PLANNER_MODEL_INFO)
        delay = spec.replay_delay_s

        class SlowReplayClient(ReplayChatCompletionClient):
            """Each answer takes ``replay_delay_s`` of a worker thread's time first (a stand-in for a model)."""

            async def create(self, *args: Any, **kwargs: Any) -> CreateResult:
                await asyncio.get_running_loop().run_in_executor(None, time.sleep, delay)
                return await super().create(*args, **kwargs)

        return SlowReplayClient(list(answers), model_info=PLANNER_MODEL_INFO)
    raise ValueError(f"unknown client kind {spec.kind!r}")
