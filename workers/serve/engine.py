"""The batched multi-LoRA decode engine: one shared base model, continuous batching, KV cache.

Plain torch, no Ray. ``Engine.step()`` admits waiting requests while rows, KV tokens and adapter
slots allow, prefills a bounded chunk of the newcomers' prompts, then decodes one token for every
row whose prompt is in, whatever adapter each row uses; finished rows leave at once and new ones
join at the next step. ``generate_batch`` drives it synchronously
(benchmarks); ``workers.serve.runner.EngineRunner`` runs the step loop in a thread for asyncio.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.serve.kv import PagedKVCache
from workers.serve.lora import DEFAULT_WRAPPED, LoraAdapter, wrap_model
from workers.serve.methods import RowMethods
from workers.serve.sampling import SamplingParams, choose, row_seed
from workers.serve.slots import DeviceSlots

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """Why one request ended with ``finish_reason="error"``: a stable code, an HTTP status and
    our own words for the client. The cause (third-party exception text) stays in our log."""

    def __init__(self, code: str, message: str, status: int = 500):
        super().__init__(message)
        self.code, self.status = code, status


class InvalidPrompt(ValueError):
    """A prompt this model cannot read; the message is ours and may be shown to the client."""


class ContextLengthExceeded(InvalidPrompt):
    """The prompt plus max_tokens do not fit in this replica's context."""


# Failures that belong to one request end that request alone; the rest of the batch goes on.
def _non_finite() -> RequestFailed:
    return RequestFailed("adapter_numerical_error",
                         "the model produced non-finite values (inf or NaN) for this request, which "
                         "usually means its adapter's weights are unusable; the request was stopped",
                         status=422)


def _adapter_placement_failed() -> RequestFailed:
    return RequestFailed("adapter_load_failed", "the adapter could not be placed on this replica's device")


def _prefill_failed() -> RequestFailed:
    return RequestFailed("generation_failed", "processing this request's prompt failed on this replica")


def _detokenize_failed() -> RequestFailed:
    return RequestFailed("generation_failed", "decoding this request's output failed on this replica")


def _engine_failed() -> RequestFailed:
    return RequestFailed("engine_failed", "the serving engine failed while running this request; "
                                          "retry it", status=503)


def _stop_prefix_at_end(text: str, end: int, stop: str) -> int:
    """The length of the longest proper prefix of ``stop`` that ``text[:end]`` ends with: text
    to hold back, as the next tokens may complete the stop string. Looks only at the last
    ``len(stop) - 1`` characters, and copies nothing of the text before them."""
    i = max(0, end - len(stop) + 1)
    while (i := text.find(stop[0], i, end)) != -1:  # candidate starts: where stop's first char is
        if stop.startswith(text[i:end]):
            return end - i  # the first candidate is the longest
        i += 1
    return 0


@dataclass
class Request:
    """One generation. The engine owns it from ``submit`` until ``finish_reason`` is set."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None
    on_event: Callable[[Request, str], None] | None  # (request, new text); called in the step thread
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed to on_event
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: BaseException | None = None
    slot: int = 0
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    seed: int = 0  # key of the row's sampling noise (sampling.row_seed)
    # Hooks for prompt and prefix tuning (``Engine.submit`` checks their shapes). The row's
    # sequence is: prefix_kv's N positions (per layer (keys, values), each (kv_heads, N, head_dim),
    # written into the row's KV blocks when it is admitted, never run through the model), then
    # prompt_embeds' M inputs ((M, hidden), fed instead of token embeddings), then prompt_ids; the
    # prompt's first token sits at position N + M.
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    prompt_embeds: torch.Tensor | None = field(default=None, repr=False)
    prefilled: int = 0  # positions of the row already in the KV cache
    decoded: tuple[int, int] = (0, 0)  # output_ids[a:b] was the last window detokenised, a <= b

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv[0][0].shape[1]

    @property
    def embeds_len(self) -> int:
        return 0 if self.prompt_embeds is None else self.prompt_embeds.shape[0]

    @property
    def context_len(self) -> int:
        """Positions before the first output token."""
        return self.prefix_len + self.embeds_len + len(self.prompt_ids)

    @property
    def kv_tokens(self) -> int:
        """KV positions the row holds at most (its last token is never fed back)."""
        return self.context_len + self.params.max_tokens - 1


class Engine:
    def __init__(self, model: nn.Module, tokenizer=None, *, max_batch: int = 32, max_len: int = 512,
                 adapter_slots: int = 16, max_adapter_bytes: int | None = None, max_rank: int = 16,
                 lora_dtype: torch.dtype | None = None, wrap: Sequence[str] = DEFAULT_WRAPPED,
                 eos_token_id: int | list[int] | None = None, max_prefill_tokens: int = 512,
                 kv_tokens: int | None = None, kv_block: int = 16):
        model.eval()
        model.config._attn_implementation = "sdpa"  # the 4-D boolean masks below are for sdpa
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_len = max_batch, max_len
        # Prompt tokens prefilled per step (longer prompts go in chunks over several steps):
        # bounds how long running rows wait for newcomers.
        self.max_prefill_tokens = max_prefill_tokens
        cfg = model.config
        self.dtype = model.get_input_embeddings().weight.dtype
        self.device = model.get_input_embeddings().weight.device
        # Adapters on the device: at most ``adapter_slots`` of them, in ``max_adapter_bytes`` of
        # pages (None: no byte limit), LoRA weights in the base's compute dtype unless told.
        lora_dtype = lora_dtype or self._compute_dtype(model)
        slots = adapter_slots + 1  # slot 0: rows without an adapter
        self.modules = wrap_model(model, targets=wrap)
        self.slots = DeviceSlots(self.modules, slots, max_rank, max_bytes=max_adapter_bytes, dtype=lora_dtype)
        # (IA)3 and DoRA rows around the LoRA layers; their shapes are refused like LoRA's
        self.methods = RowMethods(model, self.modules, slots)
        self.slots.checks.append(self.methods.check)
        # KV memory is a token budget (default: what max_batch rows of max_len used to reserve);
        # max_batch only caps the rows.
        kv_tokens = max_batch * max_len if kv_tokens is None else kv_tokens
        if kv_tokens < max_len:
            raise ValueError(f"kv_tokens ({kv_tokens}) must hold one request of max_len ({max_len}) tokens")
        self.kv = PagedKVCache(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                               head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                               tokens=kv_tokens, block_size=kv_block, dtype=self.dtype, device=self.device)
        if eos_token_id is None:  # the model's generation config may list several (chat end)
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        self._ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Lock()  # guards _waiting: submit() comes from other threads
        self._composition: tuple | None = None
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "requests_finished": 0,
                      **self.kv.usage()}

    @staticmethod
    def _compute_dtype(model: nn.Module) -> torch.dtype:
        """What the base computes in: a 4-bit layer's compute dtype, else its floating weights'."""
        for module in model.modules():
            compute = getattr(module, "compute_dtype", None)
            if isinstance(compute, torch.dtype):
                return compute
        return model.get_input_embeddings().weight.dtype

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: LoraAdapter | None = None,
               on_event: Callable[[Request, str], None] | None = None, *,
               prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               prompt_embeds: torch.Tensor | None = None) -> Request:
        """``prefix_kv`` / ``prompt_embeds``: virtual tokens before the prompt (``Request``)."""
        if not prompt_ids:
            raise InvalidPrompt("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:  # would fail the batch's forward
            raise InvalidPrompt(f"prompt token ids must be in [0, {self.vocab_size})")
        if adapter is not None and adapter.parts is not None:  # prompt / P- / prefix tuning
            self.methods.check(adapter)  # in our words, before the hooks' own shape checks
            prefix_kv = adapter.parts.prefix_kv() if prefix_kv is None else prefix_kv
            prompt_embeds = adapter.parts.virtual if prompt_embeds is None else prompt_embeds
        self._check_virtual(prefix_kv, prompt_embeds)
        req = Request(next(self._ids), list(prompt_ids), params, adapter, on_event, seed=row_seed(params),
                      prefix_kv=prefix_kv, prompt_embeds=prompt_embeds)
        if req.context_len + params.max_tokens > self.max_len:
            virtual = req.context_len - len(prompt_ids)
            raise ContextLengthExceeded(f"prompt ({len(prompt_ids)} tokens{f' + {virtual} virtual' if virtual else ''})"
                                        f" + max_tokens ({params.max_tokens}) exceeds this replica's context of "
                                        f"{self.max_len} tokens")
        if adapter is not None:
            self.slots.check(adapter)
        with self._lock:
            self._waiting.append(req)
        return req

    def _check_virtual(self, prefix_kv, prompt_embeds) -> None:
        """Shapes of the virtual-token hooks: a wrong one would fail the forward of other rows."""
        layers = self.kv.k
        if prefix_kv is not None:
            n = prefix_kv[0][0].shape[1] if prefix_kv and prefix_kv[0][0].dim() == 3 else -1
            want = (layers[0].shape[1], n, layers[0].shape[2])
            if n < 1 or len(prefix_kv) != len(layers) or any(
                    tuple(t.shape) != want for kv in prefix_kv for t in kv):
                raise ValueError(f"prefix_kv must be {len(layers)} (keys, values) pairs shaped (kv_heads, N, head_dim)")
        if prompt_embeds is not None:
            hidden = self.model.get_input_embeddings().embedding_dim
            if prompt_embeds.dim() != 2 or prompt_embeds.shape[0] < 1 or prompt_embeds.shape[1] != hidden:
                raise ValueError(f"prompt_embeds must be shaped (M, {hidden})")

    def abort(self, req: Request) -> None:
        req.cancelled = True  # honoured at the next step boundary

    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                       adapters: Sequence[LoraAdapter | None] | None = None) -> list[Request]:
        """Synchronous: submit all, step until all are done."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        reqs = [self.submit(p, sp, a) for p, sp, a in zip(prompts, params, adapters)]
        while any(r.finish_reason is None for r in reqs):
            self.step()
        return reqs

    # ---- the step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill the next chunk of newcomers' prompts, decode every row whose prompt is
        in. A failure of one request (its adapter's placement, its prompt's prefill, its numbers,
        its detokenising) ends that request alone; an exception escaping this method is
        engine-wide (the decode forward of the whole batch) and the caller ends everything with
        ``fail_all``."""
        self.stats["steps"] += 1
        self._drop_cancelled()
        for req in self._admit():  # already in _running: a failure from here on cannot lose them
            if req.prefix_kv is not None:
                self._write_prefix(req)
        chunks = self._chunks()
        if chunks:
            try:
                self._prefill(chunks)
            except Exception:  # the prefill forward holds only these rows
                log.exception("prefill of %d request(s) failed; the running rows go on", len(chunks))
                for req, _ in chunks:
                    if req.finish_reason is None:
                        self._fail(req, _prefill_failed())
        self._retire()
        if any(r.output_ids for r in self._running):
            self._decode()
            self._retire()
        self.stats.update(self.kv.usage())

    def fail_all(self, exc: BaseException) -> None:
        """An engine-wide failure: end every request with an error rather than hang its caller.
        ``exc`` is logged by the caller and kept as the cause, never shown to a client."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        running, self._running, self._composition = self._running, [], None
        for req in running + waiting:  # first: every caller gets its answer, whatever follows
            failure = _engine_failed()
            failure.__cause__ = exc
            self._fail(req, failure)
        for req in running:  # bookkeeping only: stale (even NaN) blocks are never read (kv.NULL)
            self.kv.release(req.id)
        self.stats.update(self.kv.usage())
        try:
            for req in running:
                if req.adapter is not None:
                    self.slots.release(req.adapter.key)
        except Exception:  # a dead device raises here
            log.exception("cleaning up after a failed step failed")

    def _fail(self, req: Request, failure: RequestFailed) -> None:
        req.error, req.finish_reason = failure, "error"
        self._notify(req, "")

    def _drop_cancelled(self) -> None:
        with self._lock:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                req.finish_reason = "abort"
        for req in self._running:
            if req.cancelled and req.finish_reason is None:
                req.finish_reason = "abort"
        self._retire()

    def _admit(self) -> list[Request]:
        """Move waiting requests into rows (appended to ``_running``), oldest first, while rows
        (``max_batch``), the KV cache's tokens and free adapter slots allow; none overtakes the
        oldest, so a long request is never starved by short ones. A request whose adapter cannot
        be placed is answered with an error at once; no request is ever held only in a local list."""
        new, failed = [], []
        try:
            with self._lock:
                while self._waiting and len(self._running) + len(new) < self.max_batch:
                    req = self._waiting[0]
                    if not self.kv.fits(req.kv_tokens):  # wait for running rows to free tokens
                        break
                    if req.adapter is not None:
                        try:
                            slot = self.slots.acquire(req.adapter)
                        except Exception:
                            log.exception("placing adapter %s for request %s failed",
                                          req.adapter.adapter_id, req.id)
                            failed.append(self._waiting.popleft())
                            continue
                        if slot is None:  # every slot is held by running rows: wait for one to finish
                            break
                        req.slot = slot
                    self.kv.reserve(req.id, req.kv_tokens)
                    new.append(self._waiting.popleft())
        finally:
            # Even if something above raised: admitted rows are running (fail_all reaches them)
            # and refused ones are answered, outside the lock (callbacks may take their time).
            self._running.extend(new)
            for req in failed:
                self._fail(req, _adapter_placement_failed())
        return new

    def _prepare(self, reqs: list[Request]) -> None:
        """Which pages each row's adapter has in every wrapped layer, once per composition (and
        again when the pools moved: ``DeviceSlots.generation``); no weight is copied."""
        rows = [r.slot for r in reqs]
        composition = (tuple(rows), self.slots.generation)
        if composition == self._composition:
            return
        self._composition = composition
        self.methods.prepare([(r.slot, r.adapter) for r in reqs], torch.tensor(rows, device=self.device))
        self.slots.current = self.slots.batch(rows, self.methods.input_scaled())

    def _forward(self, inputs: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs``: token ids, or input embeddings (floating point) when virtual tokens are in."""
        given = {"inputs_embeds" if inputs.is_floating_point() else "input_ids": inputs}
        out = self.model.model(**given, attention_mask=mask, position_ids=positions, cache=self.kv, use_cache=True)
        return out.last_hidden_state

    def _write_prefix(self, req: Request) -> None:
        """A newcomer's prefix-tuning keys/values into its first KV positions; if that fails,
        it fails alone."""
        try:
            self.kv.write(req.id, 0, req.prefix_kv)
            req.prefilled = req.prefix_len
        except Exception:
            log.exception("writing the prefix of request %s into the KV cache failed", req.id)
            self._fail(req, _prefill_failed())

    def _chunks(self) -> list[tuple[Request, int]]:
        """(row, prompt positions to prefill now), oldest rows first, at most ``max_prefill_tokens``
        in all: a long prompt goes in over several steps while the running rows keep decoding."""
        chunks, budget = [], self.max_prefill_tokens
        for req in self._running:
            todo = req.context_len - req.prefilled
            if budget <= 0:
                break
            if todo > 0 and req.finish_reason is None:
                chunks.append((req, min(todo, budget)))
                budget -= chunks[-1][1]
        return chunks

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        """The next ``count`` prompt positions of each row, one forward for all; a row whose
        prompt is then all in gets its first token."""
        reqs, counts = [r for r, _ in chunks], [c for _, c in chunks]
        starts = [r.prefilled for r in reqs]
        t, span = max(counts), max(s + c for s, c in zip(starts, counts))
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(t, device=self.device)
        mask = (torch.arange(span, device=self.device) <= positions[:, :, None]).unsqueeze(1)
        inputs = self._chunk_inputs(chunks, t)
        self._prepare(reqs)
        self.kv.plan([r.id for r in reqs], starts, counts)
        hidden = self._forward(inputs, positions, mask)
        self.stats["prefill_tokens"] += sum(counts)
        for req, count in chunks:
            req.prefilled += count
        done = [i for i, r in enumerate(reqs) if r.prefilled == r.context_len]
        if done:
            last = hidden[torch.tensor(done, device=self.device),
                          torch.tensor([counts[i] - 1 for i in done], device=self.device)]
            self._emit([reqs[i] for i in done], self.model.lm_head(last))

    def _chunk_inputs(self, chunks: list[tuple[Request, int]], t: int) -> torch.Tensor:
        """Token ids ``(rows, t)`` of the chunks (right padded: a row's tail is never attended to
        later), or their input embeddings where a chunk covers a row's ``prompt_embeds``."""
        ids = torch.zeros(len(chunks), t, dtype=torch.long)
        embedded = []
        for i, (req, count) in enumerate(chunks):
            j, e = req.prefilled - req.prefix_len, req.embeds_len  # j: the chunk's first input
            if j + count > e:
                a = max(j, e)
                ids[i, a - j:count] = torch.tensor(req.prompt_ids[a - e:j + count - e])
            if j < e:
                embedded.append((i, req.prompt_embeds[j:min(j + count, e)]))
        ids = ids.to(self.device)
        if not embedded:
            return ids
        x = self.model.get_input_embeddings()(ids)
        for i, part in embedded:
            x[i, :len(part)] = part.to(x)
        return x

    def _decode(self) -> None:
        """One token for every row whose prompt is in."""
        reqs = [r for r in self._running if r.output_ids and r.finish_reason is None]
        n = len(reqs)
        lengths = [r.context_len + len(r.output_ids) - 1 for r in reqs]  # the new token's position
        packed = torch.tensor([lengths, [r.output_ids[-1] for r in reqs]], device=self.device)
        positions, ids = packed[0], packed[1].view(n, 1)
        span = max(lengths) + 1
        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None]).view(n, 1, 1, span)
        self._prepare(reqs)
        self.kv.plan([r.id for r in reqs], lengths, [1] * n)
        hidden = self._forward(ids, positions.view(n, 1), mask)
        self.stats["decode_tokens"] += n
        self._emit(reqs, self.model.lm_head(hidden[:, -1]))

    def _emit(self, reqs: list[Request], logits: torch.Tensor) -> None:
        tokens, bad = choose(logits, [r.params for r in reqs], [r.seed for r in reqs],
                             [len(r.output_ids) for r in reqs])
        now = time.perf_counter()
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if i in bad:  # this row's numbers broke (its adapter): it alone stops
                log.warning("request %s (adapter %s): non-finite logits or probabilities; failing "
                            "it alone", req.id, req.adapter.adapter_id if req.adapter else None)
                self._fail(req, _non_finite())
                continue
            req.output_ids.append(token)
            if req.first_token_at is None:
                req.first_token_at = now
            if token in self.eos:
                req.finish_reason = "stop"
            elif len(req.output_ids) >= req.params.max_tokens:
                req.finish_reason = "length"
            try:
                delta = self._detokenize(req)
            except Exception:
                log.exception("detokenising request %s failed", req.id)
                self._fail(req, _detokenize_failed())
                continue
            self._notify(req, delta)

    def _detokenize(self, req: Request) -> str:
        """New text since the last event; holds back what may still become a stop string or an
        incomplete UTF-8 character.

        Incremental: only the tokens since the last decoded window are decoded, with the window
        before them as context (decoders that drop a leading space, or merge bytes, see the same
        start in both decodes), so a token costs the same at the 10th and the 10,000th. A window
        ending in an incomplete character (U+FFFD) is kept for the next token. Runs for every row
        at every step on the thread the whole batch shares, so the stop work per token is bounded
        by the new text and the stops (at most 4, each at most 256 characters:
        ``workers.serve.front``), never by the length of the output so far."""
        if self.tokenizer is None:
            return ""
        a, b = req.decoded
        if len(req.output_ids) > b:
            ids = req.output_ids
            before = self.tokenizer.decode(ids[a:b], skip_special_tokens=True) if b > a else ""
            window = self.tokenizer.decode(ids[a:], skip_special_tokens=True)
            if len(window) > len(before) and (not window.endswith("\ufffd") or req.finish_reason is not None):
                req.text += window[len(before):]
                req.decoded = (b, len(ids))
        end = len(req.text)
        for stop in req.params.stop:
            # Only where a match may newly end: the unsent text and a stop's length before it.
            at = req.text.find(stop, max(0, req.sent - len(stop)))
            if at != -1:
                req.text, req.finish_reason, end = req.text[:at], "stop", at
        if req.finish_reason is None:
            end -= max((_stop_prefix_at_end(req.text, end, stop) for stop in req.params.stop), default=0)
        end = max(end, req.sent)
        delta, req.sent = req.text[req.sent:end], end
        return delta

    def _notify(self, req: Request, delta: str) -> None:
        if req.finish_reason is not None:
            req.finished_at = time.perf_counter()
        if req.on_event is not None:
            try:
                req.on_event(req, delta)
            except Exception:  # one caller's broken callback must not fail the batch
                log.exception("event callback of request %s failed; aborting it", req.id)
                req.cancelled = True

    def _retire(self) -> None:
        """Give back the KV blocks and adapter slots of finished requests (their blocks' data,
        even NaN from a failed row, is never read again: ``kv.NULL``)."""
        keep = [r for r in self._running if r.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for req in self._running:
            if req.finish_reason is None:
                continue
            self.kv.release(req.id)
            if req.adapter is not None:
                self.slots.release(req.adapter.key)
            if req.finish_reason == "abort":
                self._notify(req, "")
            self.stats["requests_finished"] += 1
        self._running = keep
        self._composition = None
