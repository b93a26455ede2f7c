"""How big a request is, in tokens, before it runs - and how far its documents are cut so
it fits its deadline instead of being refused.

QMD's clients never honour Retry-After and give up after 300 s, so a rerank that would not
fit is better served with its documents shortened (each says `truncated`) than refused:
the reranker reads the first tokens of each document, which is where QMD's chunks put
their heading and opening. Only when even MIN_DOC_TOKENS per document cannot fit is the
request refused (503).
"""

from __future__ import annotations

from dataclasses import dataclass

from npuserve.daemon.models.qmd_conventions import MIN_DOC_TOKENS
from npuserve.daemon.sched.calibration import ModelCosts
from npuserve.daemon.sched.lane import Lane
from npuserve.daemon.sched.model import ModelState

# Share of the request timeout a cut request is planned to take (the rest is margin for
# the estimate's error).
FIT_SHARE = 0.8
# Tokens of the rerank prompt around the query (system text, instruction markers) and
# around each document; of the expansion prompt's template and a typical expansion.
PROMPT_TOKENS = 80
PER_DOCUMENT_TOKENS = 8
EXPANSION_TOKENS = 200


@dataclass(frozen=True)
class Work:
    """A request as admission sees it: characters, not yet tokens."""

    items: int  # texts or documents (the queue limit counts these)
    chars: tuple[int, ...]  # of each text or document
    prefix_chars: int = 0  # of the query (and instruction) a prompt is built around
    generated: int = 0  # tokens it will generate (expansion)
    cuttable: bool = False  # its documents may be shortened to fit (rerank)

    @property
    def total_chars(self) -> int:
        return sum(self.chars) + self.prefix_chars


@dataclass(frozen=True)
class Admission:
    model: ModelState
    lane: Lane
    tokens: float  # estimated, after any cut
    cap: int  # tokens each document may keep (0: no cut)
    deadline: float


class Sizer:
    """Token estimates from the model's own measured tokens per character."""

    def __init__(self, costs: ModelCosts, n_ctx: int) -> None:
        self.costs = costs
        self.n_ctx = n_ctx

    def _prefix(self, work: Work) -> float:
        if not work.prefix_chars:
            return 0.0
        return self.costs.tokens_for(work.prefix_chars) + PROMPT_TOKENS

    def tokens(self, work: Work, cap: int = 0) -> float:
        """Estimated tokens of `work` with each document cut to `cap` (0: uncut), each
        within the context, as the backend truncates it. A generation is priced by what
        its requests were measured to cost: its prompt is evaluated in one batch, its
        tokens one step each, so the prompt's length says little (and a prompt too long
        for the context is the backend's 400, not a 503)."""
        if work.generated:
            return self.costs.request_tokens or work.generated
        prefix = self._prefix(work)
        room = max(MIN_DOC_TOKENS, self.n_ctx - prefix) if work.cuttable else self.n_ctx
        limit = min(room, cap) if cap else room
        each = [min(self.costs.tokens_for(c) + PER_DOCUMENT_TOKENS * work.cuttable, limit)
                for c in work.chars]
        return prefix + sum(each) + work.generated

    def fit(self, work: Work, wait: float | None, rate: float | None, budget: float) -> int:
        """The largest per-document cap (tokens) with which `work` finishes within
        `budget` seconds after `wait`; 0 when it fits uncut, cannot be cut, or its cost is
        not measured yet; MIN_DOC_TOKENS when even that does not fit (admission refuses)."""
        if not work.cuttable or wait is None or rate is None:
            return 0
        if wait + rate * self.tokens(work) <= budget:
            return 0
        lo, hi = MIN_DOC_TOKENS, max(MIN_DOC_TOKENS, self.n_ctx)
        if wait + rate * self.tokens(work, lo) > budget:
            return lo
        while lo < hi:  # the largest cap that fits
            mid = (lo + hi + 1) // 2
            if wait + rate * self.tokens(work, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo
