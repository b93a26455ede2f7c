"""A document's rerank score does not depend on what else is reranked with it: not on the
other documents, their order, or how a long rerank is cut into calls (the query's prefix
KV is then kept from one call to the next). Against the whole prompt evaluated alone it
stays within the drift any other evaluation order has (README, "Logit rerank")."""

from __future__ import annotations

import os

import pytest

from npuserve.daemon.config import DEFAULT_INSTRUCTION
from npuserve.daemon.models.qmd_conventions import split_rerank_template
from npuserve.daemon.models.registry import plan_models
from npuserve.fallback.llama_common import thread_count
from npuserve.fallback.llama_generative import LlamaGenerativeBackend

QUERY = "how does apt verify package signatures before installing"
DOCS = [f"passage {i}: apt downloads archives from mirrors, verifies signatures with gpg"
        f" keys and unpacks packages in dependency order, step {i} of {i + 3}" * (1 + i % 3)
        for i in range(8)]


def open_backend(make_config, **overrides: str) -> LlamaGenerativeBackend:
    plans, task_model = plan_models(make_config(**overrides))
    b = LlamaGenerativeBackend(plans[task_model["rerank"]].spec)
    b.load()
    return b


@pytest.fixture
def backend(make_config):
    """One context: the prefix kept in its KV cells is what these tests follow."""
    b = open_backend(make_config, models__rerank__lanes="1")
    yield b
    b.unload()


@pytest.mark.skipif(thread_count(0) < 2, reason="lanes share out two or more cores")
def test_lanes_side_by_side_score_bit_for_bit_as_one_context(make_config):
    """Two contexts on one thread each take the documents in turn (fallback/llama_lane.py):
    every score is the one a single two-thread context gives, in the documents' order,
    also when the rerank arrives in slices, and for a document of several micro-batches
    that a lane finishes on both threads once the other ran out of documents."""
    one = open_backend(make_config, models__rerank__lanes="1", models__rerank__threads="2")
    two = open_backend(make_config, models__rerank__lanes="2", models__rerank__threads="2")
    docs = [*DOCS, " ".join(DOCS) * 2]  # the last: ~1,000 tokens, 8 micro-batches
    try:
        alone = one.rerank(QUERY, docs, DEFAULT_INSTRUCTION)
        side_by_side = two.rerank(QUERY, docs, DEFAULT_INSTRUCTION)
        sliced = (two.rerank(QUERY, docs[:3], DEFAULT_INSTRUCTION).scores
                  + two.rerank(QUERY, docs[3:], DEFAULT_INSTRUCTION).scores)
        assert len(two._extra_lanes) == 1  # it ran on a second context
        assert side_by_side.scores == alone.scores
        assert sliced == alone.scores
        # Each lane evaluated the query's prefix once; the documents once in all.
        assert side_by_side.tokens > alone.tokens
    finally:
        one.unload()
        two.unload()


def test_scores_do_not_depend_on_companions_order_or_calls(backend):
    together = backend.rerank(QUERY, DOCS, DEFAULT_INSTRUCTION).scores
    reversed_ = backend.rerank(QUERY, DOCS[::-1], DEFAULT_INSTRUCTION).scores[::-1]
    # Two calls with the same query, as the scheduler's slices of one rerank arrive: the
    # second reuses the prefix the first left in the KV cache.
    first = backend.rerank(QUERY, DOCS[:3], DEFAULT_INSTRUCTION)
    second = backend.rerank(QUERY, DOCS[3:], DEFAULT_INSTRUCTION)
    alone = [backend.rerank(QUERY, [d], DEFAULT_INSTRUCTION).scores[0] for d in DOCS[:2]]
    backend.rerank("another client's query", DOCS[:1], DEFAULT_INSTRUCTION)
    after_other = backend.rerank(QUERY, DOCS[3:], DEFAULT_INSTRUCTION)
    assert reversed_ == together
    assert first.scores + second.scores == together
    assert alone == together[:2]
    # The second slice did not evaluate the query's prefix again; after another query
    # the same documents do (and score the same).
    assert after_other.scores == second.scores
    assert after_other.tokens > second.tokens
    assert len(set(round(s, 4) for s in together)) > 1  # real, distinct scores


def test_reused_prefix_scores_near_the_whole_prompt_alone(backend):
    """The daemon's own rerank settings (flash attention off for rerank)."""
    reused = backend.rerank(QUERY, DOCS, DEFAULT_INSTRUCTION).scores
    template = str(backend.spec.option("template"))
    prefix, suffix = split_rerank_template(template, DEFAULT_INSTRUCTION, QUERY)
    whole = [backend.p_yes_of(backend._tokenize(prefix, special=True) + backend._tokenize(doc)
                              + backend._tokenize(suffix, special=True)) for doc in DOCS]
    assert max(abs(a - b) for a, b in zip(reused, whole, strict=True)) < 0.03, (reused, whole)
    # p_yes_of used the context for something else: the next rerank evaluates its prefix
    # again instead of trusting a cache that no longer holds it.
    assert backend.rerank(QUERY, DOCS, DEFAULT_INSTRUCTION).scores == reused


def test_a_new_query_evaluates_only_where_its_prompt_departs(backend):
    """Queries share the system prompt and instruction: the next query keeps those KV cells
    and evaluates from its own words on, and its scores are bit for bit those from an
    empty cache."""
    from_empty = backend.rerank(QUERY, DOCS[:4], DEFAULT_INSTRUCTION)
    backend.rerank("which mirrors does apt use", DOCS[:1], DEFAULT_INSTRUCTION)
    after_other = backend.rerank(QUERY, DOCS[:4], DEFAULT_INSTRUCTION)
    assert after_other.scores == from_empty.scores
    template = str(backend.spec.option("template"))
    prefix, _ = split_rerank_template(template, DEFAULT_INSTRUCTION, QUERY)
    other, _ = split_rerank_template(template, DEFAULT_INSTRUCTION, "which mirrors does apt use")
    shared = len(os.path.commonprefix([backend._tokenize(prefix, special=True),
                                       backend._tokenize(other, special=True)]))
    assert shared > 10  # the system prompt and instruction
    assert after_other.tokens == from_empty.tokens - shared
