"""QMD's expansion sampling under a grammar, on llama.cpp's samplers: shared by the CPU
backend (logits in its own context) and the RKLLM backend (logits copied out of the NPU
runtime), so both constrain and draw tokens the same way.

Applying the grammar to every candidate costs a pass over the whole vocabulary: 6 ms a
token for SmolLM2's 49k, and for gemma-3's 262k some 50 MB of transient C++ allocations
(one decoded piece per token), which set the worker's peak memory. So a token is drawn
without the grammar and the grammar checks that one token (`allows`); only a token it
rejects is drawn again, by `pick` over the CONSTRAINED_CANDIDATES most likely tokens the
grammar allows (the whole vocabulary only if it allows none of them).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

from npuserve.daemon.models.backend_api import BackendError
from npuserve.daemon.models.qmd_conventions import expansion_grammar

from .llama_session import LlamaModel

# Candidates a rejected token is drawn again from (the grammar's pass over them is what
# costs): QMD samples from the top 20, so 256 leave room for the grammar's refusals.
CONSTRAINED_CANDIDATES = 256
# llama_token_data as numpy sees it: int32 id, float logit, float p.
CANDIDATE_DTYPE = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]


@dataclass
class Sampler:
    """`free` (penalties + sampling, drawn with llama_sampler_sample) accepts its own
    draws; `grammar` and `pick` (the same chain, applied to a candidate array) accept every
    token kept, so the grammar's state and the penalties' history follow the text."""

    free: Any
    pick: Any
    grammar: Any
    one: Any  # a one-candidate llama_token_data_array for the check
    slot: Any
    candidates: Any = None  # llama_token_data[n_vocab], made on the first rejection


def expansion_chain(model: LlamaModel, opt: Any, seed: int) -> Any:
    """QMD's sampling (presence penalty, top-k, top-p, temperature); greedy at 0."""
    llama = model.lib
    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    parts = [llama.llama_sampler_init_penalties(
        llama.llama_vocab_n_tokens(model.vocab), 64, 1.0, 0.0,
        float(opt("presence_penalty", 0.5)))]
    temperature = float(opt("temperature", 0.7))
    if temperature <= 0:
        parts.append(llama.llama_sampler_init_greedy())
    else:
        parts += [llama.llama_sampler_init_top_k(int(opt("top_k", 20))),
                  llama.llama_sampler_init_top_p(float(opt("top_p", 0.8)), 1),
                  llama.llama_sampler_init_temp(temperature),
                  llama.llama_sampler_init_dist(seed)]
    for part in parts:
        llama.llama_sampler_chain_add(chain, part)
    return chain


def expansion_budget(opt: Any) -> int:
    """Tokens an expansion may generate: max_tokens, within what the bounded grammar can
    produce at all (a token is at least one character)."""
    cap = int(opt("max_lines", 6)) * (int(opt("max_line_chars", 160)) + 8)
    return max(1, min(int(opt("max_tokens", 600)), cap))


def next_seed(seed: int) -> int:
    """The seed after `seed`: a fixed seed moves on (reproducible, distinct per call);
    0xFFFFFFFF (-1) stays, a fresh random seed each time."""
    return seed if seed == 0xFFFFFFFF else (seed + 1) & 0x7FFFFFFF


def expansion_sampler(model: LlamaModel, opt: Any, seed: int) -> Sampler:
    """QMD's sampling under the bounded lex/vec/hyde grammar."""
    grammar = expansion_grammar(int(opt("max_lines", 6)), int(opt("max_line_chars", 160)))
    return grammar_sampler(model, grammar, expansion_chain(model, opt, seed),
                           expansion_chain(model, opt, seed))


def grammar_sampler(model: LlamaModel, grammar_text: str, free: Any, pick: Any) -> Sampler:
    """`free` and `pick` (sampler chains, owned from here on) under a GBNF grammar."""
    llama = model.lib
    grammar = llama.llama_sampler_init_grammar(model.vocab, grammar_text.encode(), b"root")
    if not grammar:
        llama.llama_sampler_free(free)
        llama.llama_sampler_free(pick)
        raise ValueError("llama.cpp could not parse the grammar (GBNF)")
    slot = (llama.llama_token_data * 1)()
    one = llama.llama_token_data_array(slot, 1, -1, False)
    return Sampler(free, pick, grammar, one, slot)


def free_sampler(lib: Any, smp: Sampler) -> None:
    for part in (smp.free, smp.pick, smp.grammar):
        lib.llama_sampler_free(part)


def allows(lib: Any, smp: Sampler, tok: int) -> bool:
    """Whether the grammar, where the text stands, allows `tok`."""
    smp.slot[0].id, smp.slot[0].logit, smp.slot[0].p = tok, 0.0, 0.0
    smp.one.size, smp.one.selected = 1, -1
    lib.llama_sampler_apply(smp.grammar, ctypes.byref(smp.one))
    return bool(smp.slot[0].logit != -math.inf)


def keep(lib: Any, smp: Sampler, tok: int) -> None:
    """`tok` is part of the text now: the grammar and `pick` move past it."""
    lib.llama_sampler_accept(smp.grammar, tok)
    lib.llama_sampler_accept(smp.pick, tok)


def constrained_pick(model: LlamaModel, smp: Sampler, logits: Any) -> int:
    """A token the grammar allows, drawn by `pick` from the most likely candidates of
    `logits` (a float32 numpy array over the vocabulary)."""
    import numpy as np  # only on this path

    llama = model.lib
    n_vocab = int(llama.llama_vocab_n_tokens(model.vocab))
    if smp.candidates is None:
        smp.candidates = (llama.llama_token_data * n_vocab)()
    view = np.frombuffer(smp.candidates, dtype=CANDIDATE_DTYPE)
    k = min(CONSTRAINED_CANDIDATES, n_vocab)
    for ids in (np.argpartition(logits, n_vocab - k)[n_vocab - k:], None):
        n = n_vocab if ids is None else len(ids)
        view["id"][:n] = np.arange(n_vocab) if ids is None else ids
        view["logit"][:n] = logits if ids is None else logits[ids]
        view["p"][:n] = 0.0
        cur = llama.llama_token_data_array(smp.candidates, n, -1, False)
        llama.llama_sampler_apply(smp.grammar, ctypes.byref(cur))
        if np.isfinite(view["logit"][:n]).any():
            llama.llama_sampler_apply(smp.pick, ctypes.byref(cur))
            return int(view["id"][cur.selected])
    # Unreachable with QMD's grammar (a line can always end); a stuck grammar must
    # fail the request, not abort the worker in llama.cpp's accept.
    raise BackendError("the expansion grammar allows no token here")


def piece(model: LlamaModel, tok: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = model.lib.llama_token_to_piece(model.vocab, tok, buf, 64, 0, False)
    return buf.raw[:max(0, n)]


def chat_tokens(model: LlamaModel, user: str) -> list[int]:
    """One user turn and the assistant's start in the model's own chat template (llama.cpp's
    built-in renderer), ChatML if it has none."""
    llama = model.lib
    template = llama.llama_model_chat_template(model.ptr, None)
    text = None
    if template:
        msg = llama.llama_chat_message(role=b"user", content=user.encode())
        chat = (llama.llama_chat_message * 1)(msg)
        size = len(user.encode()) * 2 + 512
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_chat_apply_template(template, chat, 1, True, buf, size)
        if n > size:  # returns the length it needs
            size = n
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_chat_apply_template(template, chat, 1, True, buf, size)
        if 0 < n <= size:
            text = buf.raw[:n].decode("utf-8", "replace")
    if text is None:
        text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return model.tokenize(text, add_special=True, parse_special=True)
