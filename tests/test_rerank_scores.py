"""Rerank scores do not depend on how the prompt reaches the model: with the prefix's KV
cache reused, each document scores what its whole prompt scores evaluated alone."""

from __future__ import annotations

from npuserve.daemon.config import DEFAULT_INSTRUCTION
from npuserve.daemon.models.qmd_conventions import split_rerank_template
from npuserve.daemon.models.registry import plan_models
from npuserve.fallback.llama_generative import LlamaGenerativeBackend

QUERY = "how does apt verify package signatures before installing"
DOCS = [f"passage {i}: apt downloads archives from mirrors, verifies signatures with gpg"
        f" keys and unpacks packages in dependency order, step {i} of {i + 3}" * 2
        for i in range(8)]


def test_prefix_reuse_scores_as_the_whole_prompt_alone(make_config):
    """The daemon's own rerank settings (flash attention off for rerank: with it on, the
    same documents moved by up to 0.06 between these two ways)."""
    plans, task_model = plan_models(make_config())
    spec = plans[task_model["rerank"]].spec
    backend = LlamaGenerativeBackend(spec)
    backend.load()
    try:
        reused = backend.rerank(QUERY, DOCS, DEFAULT_INSTRUCTION).scores
        template = str(spec.option("template"))
        prefix, suffix = split_rerank_template(template, DEFAULT_INSTRUCTION, QUERY)
        alone = [backend.p_yes_of(backend._tokenize(prefix, special=True)
                                  + backend._tokenize(doc)
                                  + backend._tokenize(suffix, special=True)) for doc in DOCS]
    finally:
        backend.unload()
    assert max(abs(a - b) for a, b in zip(reused, alone, strict=True)) < 1e-4, (reused, alone)
    assert len(set(round(s, 4) for s in reused)) > 1  # real, distinct scores
