"""A chat model on an OpenAI-compatible server (vLLM), and the small HTTP client both remote seams use.

Prompts go as token ids to `/v1/completions`, built here with the exact chat template (model.backend), so
message text is never templated or tokenized by the server: it cannot turn into control tokens there.
Replies come back streamed (server-sent events) as token ids and are detokenized here. Only the standard
library is used: one connection per request, closed when the reply ends, fails or is stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

from model.backend import ChatBackend, TurnStats
from model.errors import ModelError
from model.sampling import Sampling

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # the longest wait for the next piece of a reply (a long prompt's prefill comes first)
CANCEL_POLL_S = 0.05


class RemoteError(ModelError):
    title = "Server error"


class ServerUnreachable(RemoteError):
    """No answer at the address given: a setting to fix or a server to start (`llama-chat ask` exits 2)."""

    title = "Server unreachable"
    exit_code = 2


class OpenAIServer:
    """An OpenAI-compatible endpoint: `base_url` up to and including /v1. The API key, if any, is read from
    the environment variable named `api_key_env` at each request, so it is never stored."""

    def __init__(self, base_url: str, *, api_key_env: str = "", timeout: float = READ_TIMEOUT_S):
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise RemoteError(f"{base_url!r} is not a server address; give one like http://127.0.0.1:8000/v1.")
        self.base_url, self.url, self.api_key_env, self.timeout = base_url.rstrip("/"), url, api_key_env, timeout

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RemoteError(f"The environment variable {self.api_key_env} (api_key_env) is not set; set it to "
                                  f"the API key of {self.base_url}, or leave api_key_env empty for a server without "
                                  "one.")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _open(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        """Send one request; returns (connection, response) with a 2xx status, or raises RemoteError."""
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.url.hostname, self.url.port, timeout=CONNECT_TIMEOUT_S)
        target = f"{self.url.path}{path}"
        try:
            conn.connect()
            conn.sock.settimeout(timeout or self.timeout)
            conn.request(method, target, body=json.dumps(body) if body is not None else None, headers=self._headers())
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerUnreachable(f"The server at {self.base_url} did not answer ({_reason(e)}). Is it running? "
                                    "Check base_url, or start the server.") from e
        if resp.status // 100 != 2:
            detail = resp.read(2000).decode("utf-8", "replace")
            conn.close()
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail) or detail
            except (ValueError, AttributeError):
                pass
            raise RemoteError(f"{self.base_url}{path} answered HTTP {resp.status}: {detail.strip()[:500]}")
        return conn, resp

    def get(self, path: str, timeout: float | None = None) -> dict:
        conn, resp = self._open("GET", path, timeout=timeout)
        try:
            return _json(resp.read(), self.base_url + path)
        finally:
            conn.close()

    def post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        conn, resp = self._open("POST", path, body, timeout=timeout)
        try:
            return _json(resp.read(), self.base_url + path)
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"{self.base_url} stopped answering: {_reason(e)}") from e
        finally:
            conn.close()

    def events(self, path: str, body: dict, cancel: threading.Event | None = None) -> Iterator[dict]:
        """The server-sent events of a streamed request, as dicts, until `data: [DONE]`. Setting `cancel`
        closes the connection at once (vLLM then aborts the request); closing the generator does too."""
        conn, resp = self._open("POST", path, body)
        done = threading.Event()

        def watch():  # a read blocked on a silent server ends when the socket is shut
            while not done.wait(CANCEL_POLL_S):
                if cancel.is_set():
                    _shut(conn)
                    return

        if cancel is not None:
            threading.Thread(target=watch, daemon=True, name="llama-chat-cancel").start()
        try:
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    if cancel is not None and cancel.is_set():
                        return
                    raise RemoteError(f"{self.base_url} stopped answering mid-reply ({_reason(e)}).",
                                      title="Server stopped") from e
                if not line:
                    if cancel is not None and cancel.is_set():
                        return
                    raise RemoteError(f"{self.base_url} closed the reply before it ended (the server stopped or "
                                      "restarted).", title="Server stopped")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = _json(data, self.base_url + path)
                if "error" in event:
                    raise RemoteError(f"{self.base_url} failed mid-reply: {event['error']}", title="Server error")
                yield event
        finally:
            done.set()
            conn.close()

    def models(self) -> list[dict]:
        """The models the server serves (`GET /models`), each with its `id` (and vLLM's max_model_len)."""
        data = self.get("/models", timeout=15).get("data")
        if not isinstance(data, list):
            raise RemoteError(f"{self.base_url}/models did not list models; is this an OpenAI-compatible server?")
        return data

    def pick_model(self, served_model: str) -> dict:
        """The served model named `served_model`, or the only one when no name is given."""
        models = self.models()
        names = [m.get("id", "") for m in models]
        if served_model:
            if served_model not in names:
                raise RemoteError(f"{self.base_url} does not serve {served_model!r}; it serves "
                                  f"{', '.join(names) or 'nothing'}. Set served_model to one of those.",
                                  title="Model not served")
            return models[names.index(served_model)]
        if len(models) != 1:
            raise RemoteError(f"{self.base_url} serves {len(models)} models ({', '.join(names)}); say which with "
                              "served_model.", title="Which model?")
        return models[0]


def _shut(conn) -> None:
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__


def _json(data: bytes, where: str) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        raise RemoteError(f"{where} answered something that is not JSON: {data[:200]!r}") from None
    if not isinstance(value, dict):
        raise RemoteError(f"{where} answered {type(value).__name__}, not a JSON object")
    return value


def local_generation_config(folder: Path) -> dict:
    """generation_config.json beside the tokenizer, if there is one."""
    try:
        return json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class RemoteChat(ChatBackend):
    """The chat model a vLLM server serves, with prompts built from the local tokenizer."""

    device = "remote"

    def __init__(self, server: OpenAIServer, tokenizer, *, name: str, served_model: str, context_window: int,
                 eos_ids, defaults: dict):
        super().__init__()
        self.server, self.tokenizer, self.name, self.served_model = server, tokenizer, name, served_model
        self.engine = f"vLLM {server.base_url}"
        self.context_window, self.eos_ids, self.defaults = context_window, frozenset(eos_ids), defaults

    @classmethod
    def connect(cls, base_url: str, *, tokenizer: str, served_model: str = "", api_key_env: str = "",
                context_window: int | None = None) -> "RemoteChat":
        """Ask the server which model it serves (and its context length), and load `tokenizer` (a repo id, a
        folder or a checkpoint: model.loading.resolve_tokenizer) to build prompts with."""
        from model.loading import load_tokenizer, resolve_tokenizer

        server = OpenAIServer(base_url, api_key_env=api_key_env)
        entry = server.pick_model(served_model)
        source = resolve_tokenizer(tokenizer)
        tok = load_tokenizer(source)
        gen = local_generation_config(source.path)
        eos = [i for v in (gen.get("eos_token_id"), tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"))
               for i in (v if isinstance(v, list) else [v]) if isinstance(i, int) and i != tok.unk_token_id]
        if not eos:
            raise ModelError(f"The tokenizer at {source.path} names no end-of-sequence token; it cannot be used for "
                             "chat.")
        do_sample = gen.get("do_sample", False)
        defaults = {"temperature": float(gen.get("temperature") or 0.6) if do_sample else 0.0,
                    "top_p": float(gen.get("top_p") or 1.0), "top_k": int(gen.get("top_k") or 0)}
        served_len = int(entry.get("max_model_len") or 8192)
        return cls(server, tok, name=entry["id"], served_model=entry["id"], eos_ids=eos, defaults=defaults,
                   context_window=min(context_window or served_len, served_len))

    def describe(self) -> str:
        return self.engine

    def _generate(self, ids: list[int], sampling: Sampling, stats: TurnStats,
                  cancel: threading.Event | None) -> Iterator[int]:
        s = sampling
        body = {
            "model": self.served_model, "prompt": ids, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max(1, min(s.max_new_tokens, self.context_window - len(ids))),
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or -1,
            "repetition_penalty": s.repetition_penalty or 1.0, "seed": s.seed,
            "stop_token_ids": sorted(self.eos_ids), "return_token_ids": True,
            "skip_special_tokens": False, "add_special_tokens": False,
        }
        for event in self.server.events("/completions", {k: v for k, v in body.items() if v is not None}, cancel):
            usage = event.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                stats.cached_tokens = cached
            for choice in event.get("choices") or ():
                yield from choice.get("token_ids") or ()
                if choice.get("finish_reason") == "length":
                    stats.stop_reason = "length"
                elif choice.get("finish_reason"):
                    stats.stop_reason = "eos"
