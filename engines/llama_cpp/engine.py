"""llama.cpp behind the Engine interface, as a managed ``llama-server`` child process.

Why a child and not llama-cpp-python in process: llama-server already is llama.cpp's
continuous-batching scheduler (``--parallel`` slots decoded in one ``llama_batch`` per
step), so the engine gets llama.cpp's own speed at every concurrency without a second
scheduler written here; a crash in native code kills the child, not the server, which then
reports UNAVAILABLE and NOT_SERVING (Ollama runs llama.cpp the same way).  The child
listens on a Unix socket in a private folder, so nothing else on the machine can reach it.

Requests keep our request path (engines/base.py): our tokenizer (the GGUF's own vocabulary)
makes the token ids, our admission bounds the queue, and only as many requests as there are
slots reach the child.  Closing a stream closes its HTTP connection; llama-server stops that
slot's work at its next token and frees the slot's cells.

Log-probabilities: llama-server's ``n_probs`` with ``post_sampling_probs: false`` is the
log-softmax of the raw logits, our convention, for generated tokens.  It has none for prompt
tokens, so ``prompt_logprobs`` and scoring are refused by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import model_facts
from engines.admission import Admission
from engines.base import Engine, EngineInfo, EngineLoad, EngineRequest, GenerationOutput
from engines.errors import EngineUnavailable, InvalidRequest
from engines.llama_cpp.gguf import GGUFModel, llama_server_binary, resolve_gguf
from engines.logprobs import TokenLogprob, TopLogprob
from engines.model_facts import DEFAULT_CONTEXT, context_length
from engines.options import option
from engines.params import GREEDY_BELOW_TEMPERATURE, SamplingParams

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0
# llama-server's stop types to our finish reasons.
_FINISH = {"eos": "eos", "word": "stop", "limit": "length"}


@dataclass(frozen=True)
class LlamaCppOptions:
    threads: int = option(0, "llama.cpp: CPU threads (0: all cores)", minimum=0)
    parallel: int = option(16, "llama.cpp: sequences decoded together (llama-server --parallel)", positive=True)
    context: int | None = option(
        None, f"llama.cpp: context per sequence (default: the model's, at most {DEFAULT_CONTEXT})", positive=True
    )
    batch_size: int = option(2048, "llama.cpp: tokens per llama_decode at most (llama-server -b)", positive=True)
    # Repacked Q4_0 weights run faster than the file's own layout on this machine's CPU (llama-bench,
    # 7B Q4_0, 2 threads: prompt 11.5 against 7.4 tokens/s, decode 2.67 against 2.36); the build
    # leaves out the AMX kernels that died on them (scripts/build_llama_cpp.sh).
    repack: bool | None = option(None, "llama.cpp: repack weights for the CPU's own kernels (auto: on)")
    llama_server: str = option("", "llama.cpp: the llama-server binary (default: the one `make llama-cpp` builds)")

    def repacks(self) -> bool:
        """--repack as it runs: auto is on."""
        return self.repack is not False


class LlamaCppEngine(Engine):
    name = "llama-cpp"
    Options = LlamaCppOptions
    requires = ("aiohttp",)
    offers_logprobs = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self._process: Any = None  # asyncio.subprocess.Process once started
        self._folder: Path | None = None
        self._client: Any = None  # aiohttp.ClientSession, imported when the engine starts
        self._watcher: asyncio.Task | None = None
        self._tokens_held: dict[str, int] = {}

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        import aiohttp
        from transformers import AutoConfig, AutoTokenizer

        options = self.options
        assert isinstance(options, LlamaCppOptions)
        if self.config.device not in ("auto", "cpu"):
            raise EngineUnavailable(f"engine llama-cpp is built for the CPU; --device {self.config.device} is not")
        binary = llama_server_binary(options.llama_server)
        self._gguf: GGUFModel = await asyncio.to_thread(resolve_gguf, self.config.model, self.config.dtype)
        where = dict(gguf_file=self._gguf.tokenizer_gguf, trust_remote_code=self.config.trust_remote_code)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._gguf.tokenizer_folder, **where)
        model_config = await asyncio.to_thread(AutoConfig.from_pretrained, self._gguf.tokenizer_folder, **where)
        # Every end-of-sequence id of the folder's generation_config.json: the GGUF keeps one, llama-server stops
        # at its own end-of-generation tokens only, so the others end a completion in _stream.
        eos = model_facts.generation_eos_ids(self._gguf.tokenizer_folder) if self._gguf.tokenizer_gguf is None else ()
        self._eos_ids = frozenset(eos)
        self._context = options.context or min(DEFAULT_CONTEXT, context_length(model_config))
        self._parallel = self.config.max_concurrency or options.parallel
        self._threads = options.threads or os.cpu_count() or 1
        self._folder = Path(tempfile.mkdtemp(prefix="yayi-llama-"))  # 0700: only this user reaches the socket
        socket_path = self._folder / "llama-server.sock"
        command = [str(binary), "--model", str(self._gguf.path), "--host", str(socket_path)]
        command += ["--parallel", str(self._parallel), "--ctx-size", str(self._context * self._parallel)]
        command += ["--threads", str(self._threads), "--batch-size", str(options.batch_size)]
        command += ["--no-webui", "--no-kv-unified", "--seed", "0"]
        command += [] if options.repacks() else ["--no-repack"]
        log.info("llama-cpp: starting %s", " ".join(command))
        self._log_path = self._folder / "llama-server.log"
        with open(self._log_path, "wb") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        # aiohttp, not httpx: every token crosses this socket as one server-sent event, and
        # aiohttp's C parser reads one for a fraction of httpx's pure-Python cost, CPU that
        # llama.cpp's threads on the same cores would otherwise not get (bench/server_threads.py).
        # A fresh connection per request (force_close): llama-server (cpp-httplib) closes idle
        # keep-alive connections on its own clock, and a request sent on one it just closed would
        # fail; closing a stream's connection is also how its slot is stopped. On a Unix socket a
        # connection costs microseconds.
        connector = aiohttp.UnixConnector(path=str(socket_path), limit=self._parallel + 4, force_close=True)
        self._client = aiohttp.ClientSession(
            base_url="http://llama-server", connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )
        await self._wait_healthy()
        self._watcher = asyncio.create_task(self._watch())
        log.info(
            "llama-cpp: %s (%s), %d slots of %d tokens, %d threads",
            self._gguf.path.name,
            self._gguf.weights,
            self._parallel,
            self._context,
            self._threads,
        )
        self._open(
            tokenizer,
            self._context,
            len(tokenizer),
            Admission(self._parallel, self.config.max_queue, self.config.max_queue_wait_s),
        )

    async def _wait_healthy(self) -> None:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            if self._process.returncode is not None:
                code = self._process.returncode
                raise EngineUnavailable(f"llama-server exited at start-up (code {code}): {self._tail()}")
            with contextlib.suppress(Exception):
                async with self._client.get("/health") as response:
                    if response.status == 200:
                        return
            if asyncio.get_running_loop().time() > deadline:
                raise EngineUnavailable(f"llama-server did not become healthy in {START_TIMEOUT_S:g} s: {self._tail()}")
            await asyncio.sleep(0.1)

    async def _watch(self) -> None:
        code = await self._process.wait()
        if not self._closing:
            reason = f"llama-server exited with code {code}"
            self.fail(reason)
            log.error("llama-cpp: %s: %s", reason, self._tail())

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self._log_path.read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-3:])
        return ""

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._client is not None:
            await self._client.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    # ---- what the server asks ---------------------------------------------------------

    def info(self) -> EngineInfo:
        self._require_ready()
        return EngineInfo(
            engine=self.name,
            model=self.config.model,
            dtype=self._gguf.weights,
            device="cpu",
            attention="llama.cpp (flash attention auto)",
            use_cache=True,
            max_context=self._context,
            vocab_size=self._vocab_size,
            max_concurrent_requests=self._parallel,
            max_queue=self.config.max_queue,
            model_path=str(self._gguf.path),
            kv_cache_tokens=self._context * self._parallel,
            custom_code=self.custom_code,
        )

    def load(self) -> EngineLoad:
        load = super().load()
        cells = self._context * getattr(self, "_parallel", 1)
        usage = min(1.0, sum(self._tokens_held.values()) / cells) if cells else 0.0
        return EngineLoad(running=load.running, waiting=load.waiting, kv_cache_usage=usage)

    def check_params(self, params: SamplingParams) -> None:
        if params.prompt_logprobs is not None:
            raise InvalidRequest(
                "engine llama-cpp cannot return the prompt's log-probabilities (llama-server gives them for "
                "generated tokens only)",
                field="prompt_logprobs",
            )

    async def stream_tokens(self, request: EngineRequest):
        import aiohttp

        params = request.params
        body = _request_body(request, self._context)
        # Ended here: llama-server's completion body takes stop strings, not ids.
        ending = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos_ids))
        completion = 0
        self._tokens_held[request.request_id] = len(request.prompt_ids)
        try:
            async with self._client.post("/completion", json=body) as response:
                if response.status != 200:
                    detail = (await response.read()).decode(errors="replace")[:300]
                    raise self._unavailable(f"llama-server answered {response.status}: {detail}")
                async for line in response.content:  # one line at a time
                    if not line.startswith(b"data: "):
                        continue
                    chunk = json.loads(line[6:])
                    ids = tuple(int(t) for t in chunk.get("tokens") or ())
                    text = chunk.get("content", "")
                    finish = _FINISH.get(chunk.get("stop_type"), "length") if chunk.get("stop") else None
                    hit = next((i for i, token in enumerate(ids) if token in ending), None)
                    if hit is not None:
                        # The ending id is kept, its text is not (as the model's own EOS); closing the
                        # connection on return stops llama-server's slot.
                        finish = "stop" if ids[hit] in params.stop_token_ids else "eos"
                        ids, text = ids[: hit + 1], ("" if hit == 0 else text)
                    completion += len(ids)
                    self._tokens_held[request.request_id] = len(request.prompt_ids) + completion
                    entries: tuple[TokenLogprob, ...] = ()
                    if params.logprobs is not None:
                        positions = (chunk.get("completion_probabilities") or ())[: len(ids)]
                        entries = _entries(ids, positions, params.logprobs)
                    if not ids and finish is None:
                        continue
                    yield GenerationOutput(
                        text=text,
                        token_ids=ids,
                        prompt_tokens=len(request.prompt_ids),
                        completion_tokens=completion,
                        finish_reason=finish,
                        logprobs=entries,
                    )
                    if finish is not None:
                        return
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._unavailable(f"lost llama-server ({type(exc).__name__}: {exc})") from exc
        finally:
            self._tokens_held.pop(request.request_id, None)

    def _unavailable(self, why: str) -> EngineUnavailable:
        if self._process is not None and self._process.returncode is not None:
            reason = f"llama-server exited with code {self._process.returncode}"
            self.fail(reason)
            return EngineUnavailable(f"the llama-server process died ({reason}); restart the server")
        return EngineUnavailable(why)


def _request_body(request: EngineRequest, context: int) -> dict:
    params = request.params
    body = {
        "prompt": list(request.prompt_ids),
        "n_predict": params.max_new_tokens,
        "stream": True,
        "return_tokens": True,
        "cache_prompt": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        # 0: off, in llama.cpp as here. Greedy is top_k 1: the same token, and llama.cpp's sampler
        # chain then never sorts the whole vocabulary of every sequence at every step.
        "top_k": 1 if params.temperature < GREEDY_BELOW_TEMPERATURE else params.top_k,
        # llama-server's defaults trim by min_p 0.05 and penalise the last 64 tokens only; ours
        # are no min_p and the whole sequence, as transformers and vLLM do.
        "min_p": 0.0,
        "repeat_penalty": params.repetition_penalty,
        "repeat_last_n": context,
        "stop": list(params.stop),
        "ignore_eos": params.ignore_eos,
        "seed": params.seed if params.seed is not None else -1,
    }
    if params.logprobs is not None:
        # n_probs 0 would give none at all; the chosen token's own comes with the top list.
        body.update(n_probs=max(1, params.logprobs), post_sampling_probs=False)
    return body


def _entries(token_ids, positions, k: int) -> tuple[TokenLogprob, ...]:
    if len(positions) != len(token_ids):
        raise RuntimeError(f"llama-server returned {len(positions)} log-probabilities for {len(token_ids)} tokens")
    entries = []
    for token, position in zip(token_ids, positions, strict=True):
        top = tuple(
            TopLogprob(token_id=int(t["id"]), text="", logprob=float(t["logprob"]))
            for t in position.get("top_logprobs", ())[:k]
        )
        entries.append(TokenLogprob(token_id=int(token), text="", logprob=float(position["logprob"]), top=top))
    return tuple(entries)
