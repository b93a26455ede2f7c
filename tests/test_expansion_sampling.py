"""Expansion generated side by side under the bounded grammar, sampled the cheap way
(the grammar checks a sampled token, and only a rejected one is drawn again)."""

from __future__ import annotations

import re

import pytest

from npuserve.daemon.models.backend_api import ExpandRequest
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_generative import LlamaGenerativeBackend

LINE = re.compile(r"^(lex|vec|hyde): [^\n]{1,40}$")


@pytest.fixture(scope="module")
def backend(models_dir):
    path = str(next(models_dir.glob("SmolLM2*.gguf")))
    b = LlamaGenerativeBackend(ModelSpec(
        "g", "llama_cpp_generative", path, 2048, 0,
        (("temperature", 0.9), ("max_lines", 3), ("max_line_chars", 40), ("seed", 7),
         ("max_tokens", 200))))
    b.load()
    yield b
    b.unload()


def test_every_sampled_text_obeys_the_grammar(backend):
    requests = [ExpandRequest(f"how do I pin threads to cores {i}", None, True)
                for i in range(6)]
    outs = backend.expand_many(requests)
    assert len(outs) == len(requests)
    for out in outs:
        raw_lines = out.raw.split("\n")
        assert raw_lines[-1] == "", repr(out.raw)  # the grammar ends every line
        assert 1 <= len(raw_lines) - 1 <= 3, repr(out.raw)
        assert all(LINE.match(line) for line in raw_lines[:-1]), repr(out.raw)
        assert out.tokens > 0


def test_a_rejected_token_is_drawn_again_from_the_whole_vocabulary_if_need_be(
        backend, monkeypatch):
    """One candidate kept for a redraw: the most likely token, which the grammar has often
    just rejected, so redraws go on to the whole vocabulary; the text obeys the grammar."""
    import npuserve.fallback.llama_sampling as sampling

    monkeypatch.setattr(sampling, "CONSTRAINED_CANDIDATES", 1)
    out = backend.expand("how do I pin threads to cores", None, True)
    raw_lines = out.raw.split("\n")
    assert raw_lines[-1] == "" and len(raw_lines) >= 2, repr(out.raw)
    assert all(LINE.match(line) for line in raw_lines[:-1]), repr(out.raw)


def test_side_by_side_and_alone_give_the_same_kind_of_answer(backend):
    alone = backend.expand("sqlite full text search", None, False)
    together = backend.expand_many([ExpandRequest("sqlite full text search", None, False),
                                    ExpandRequest("mdns service discovery", None, True)])
    for out in (alone, together[0]):
        assert out.lines and all(kind in ("vec", "hyde") for kind, _ in out.lines)
    assert together[1].lines


def test_a_micro_batch_smaller_than_the_parallel_sequences_still_works(models_dir):
    """models.expand.n_ubatch = 2 with four expansions side by side: a step decodes one
    token per sequence, so the batch never holds fewer than the parallel sequences."""
    path = str(next(models_dir.glob("SmolLM2*.gguf")))
    b = LlamaGenerativeBackend(ModelSpec("g", "llama_cpp_generative", path, 2048, 0,
                                         (("n_ubatch", 2), ("temperature", 0.0),
                                          ("max_tokens", 24))))
    b.load()
    try:
        outs = b.expand_many([ExpandRequest(f"apt signatures {i}", None, True)
                              for i in range(4)])
    finally:
        b.unload()
    assert len(outs) == 4 and all(out.lines and out.tokens > 0 for out in outs)


def test_greedy_expansions_side_by_side_are_those_made_alone(models_dir):
    """Each expansion of a coalesced batch is the one its request gets alone, token for
    token (with llama.cpp's unified KV cells, 3 of these 8 came out different), and a
    rerank between them scores as before."""
    path = str(next(models_dir.glob("SmolLM2*.gguf")))
    b = LlamaGenerativeBackend(ModelSpec("g", "llama_cpp_generative", path, 2048, 0,
                                         (("temperature", 0.0), ("max_tokens", 48))))
    b.load()
    queries = ["debian kernel modules", "sqlite full text search", "mdns service discovery",
               "cpu thread pinning", "apt package signatures", "systemd unit hardening",
               "python virtual environments", "reciprocal rank fusion"]
    requests = [ExpandRequest(q, None, True) for q in queries]
    docs = ["apt verifies signatures with gpg keys", "cats sleep sixteen hours a day"]
    try:
        before = b.rerank("how does apt check packages", docs, "").scores
        together = b.expand_many(requests)
        after = b.rerank("how does apt check packages", docs, "").scores
        alone = [b.expand_many([r])[0] for r in requests]
    finally:
        b.unload()
    assert [o.raw for o in together] == [o.raw for o in alone]
    assert before == after


def test_long_expansions_are_generated_in_groups_that_fit_the_context(models_dir):
    """A ~22-token prompt and max_tokens 100 in a 512-token context: four sequences fit
    side by side (a stream of 128 cells each), so seven requests run as groups of four and
    three - and all are answered."""
    path = str(next(models_dir.glob("SmolLM2*.gguf")))
    b = LlamaGenerativeBackend(ModelSpec("g", "llama_cpp_generative", path, 512, 0,
                                         (("temperature", 0.0), ("max_tokens", 100))))
    b.load()
    sizes: list[int] = []
    generate = b._generate

    def spy(group, *args):  # records the group sizes the backend chose
        sizes.append(len(group))
        return generate(group, *args)

    b._generate = spy  # type: ignore[method-assign]
    try:
        outs = b.expand_many([ExpandRequest(f"apt signatures {i}", None, True)
                              for i in range(7)])
    finally:
        b.unload()
    assert sizes == [4, 3]
    assert all(out.lines and out.tokens > 0 for out in outs)
