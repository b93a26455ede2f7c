"""QMD's model conventions, shared by every backend: the expansion prompt, its
bounded grammar, the line filter and fallback, and the split of the rerank
prompt into a per-request prefix and a per-document part, and the rerank score."""

from __future__ import annotations

import math
import re

EXPAND_TYPES = ("lex", "vec", "hyde")
_WORD = re.compile(r"[\w']+", re.UNICODE)
# Words too common to prove a line is about the query.
_STOPWORDS = frozenset(
    "a an and are as at be by for from how in is it of on or the to what when where which who why"
    " with".split()
)


def expansion_prompt(query: str, intent: str | None = None) -> str:
    prompt = f"/no_think Expand this search query: {query}"
    if intent:
        prompt += f"\nQuery intent: {intent}"
    return prompt


EXPANSION_PREFIXES = ("Expand this search query:", "/no_think Expand this search query:")


def is_expansion_request(user_message: str) -> bool:
    """A chat or completion request that carries QMD's expansion prompt (its own, or the
    OpenAI-style clients' user message): it gets the lex/vec/hyde grammar."""
    return user_message.lstrip().startswith(EXPANSION_PREFIXES)


def parse_expansion_request(user_message: str) -> tuple[str, str | None]:
    """(query, intent) of an expansion prompt: `[/no_think ]Expand this search query: <q>`
    with an optional `\nQuery intent: <i>` line."""
    text = user_message.lstrip()
    for prefix in sorted(EXPANSION_PREFIXES, key=len, reverse=True):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    query, _, rest = text.partition("\nQuery intent:")
    return query.strip(), (rest.strip() or None)


def expansion_grammar(max_lines: int, max_line_chars: int) -> str:
    """QMD's grammar with `line+` replaced by at most `max_lines` lines of at most
    `max_line_chars` characters, so generation always ends: a small model under
    an unbounded `line+` / `[^\\n]+` repeats itself until max_tokens."""
    body = "line"
    for _ in range(max_lines - 1):
        body = f"line ({body})?"
    return (
        f"root ::= {body}\n"
        'line ::= type ": " content "\\n"\n'
        'type ::= "lex" | "vec" | "hyde"\n'
        f"content ::= [^\\n]{{1,{max_line_chars}}}\n"
    )


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def parse_expansion(
    raw: str, query: str, include_lexical: bool = True
) -> list[tuple[str, str]]:
    """Lines `type: text` that share a term with the query; QMD's fallback when none do."""
    query_terms = _terms(query)
    lines: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for line in raw.splitlines():
        kind, sep, text = line.partition(":")
        kind, text = kind.strip().lower(), text.strip()
        if not sep or kind not in EXPAND_TYPES or not text:
            continue
        if kind == "lex" and not include_lexical:
            continue
        if query_terms and not (query_terms & _terms(text)):
            continue
        if (kind, text) not in seen:
            seen.add((kind, text))
            lines.append((kind, text))
    return lines or fallback_expansion(query, include_lexical)


def fallback_expansion(query: str, include_lexical: bool = True) -> list[tuple[str, str]]:
    lines = [("hyde", f"Information about {query}")]
    if include_lexical:
        lines.append(("lex", query))
    lines.append(("vec", query))
    return lines


def split_rerank_template(template: str, instruction: str, query: str) -> tuple[str, str]:
    """(prefix, suffix) around {document}: the prefix is evaluated once per request."""
    if template.count("{document}") != 1:
        raise ValueError("rerank template must contain {document} exactly once")
    before, after = template.split("{document}")
    fill = {"instruction": instruction, "query": query}
    return _fill(before, fill), _fill(after, fill)


def _fill(text: str, values: dict[str, str]) -> str:
    # str.format would choke on braces inside queries; replace only our fields.
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


# Tokens a document keeps at least in a rerank prompt; a query that leaves less room is
# refused.
MIN_DOC_TOKENS = 16


def p_yes(logit_yes: float, logit_no: float) -> float:
    """The rerank score: softmax([yes, no])[yes] at the prompt's last position, stably."""
    return 1.0 / (1.0 + math.exp(logit_no - logit_yes))
