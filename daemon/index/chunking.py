"""Split documents into chunks of at most N embedding-model tokens, with overlap.

Markdown-aware where it is cheap: text is cut into segments at headings and
blank lines first, then sentences, then words, and segments are packed
greedily. Token counts come from the embedding model's own tokenizer (via a
callback, so this module needs no model library).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

CountFn = Callable[[list[str]], Awaitable[list[int]]]
_HEADING = re.compile(r"(?m)^(?=#{1,6}\s)")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Chunk:
    text: str
    tokens: int


def segments(text: str) -> list[str]:
    """Headings start new segments; blank lines end paragraphs."""
    out: list[str] = []
    for section in _HEADING.split(text):
        for para in _PARAGRAPH.split(section):
            if para.strip():
                out.append(para.strip())
    return out


def _split_further(segment: str) -> list[str]:
    parts = [p for p in _SENTENCE.split(segment) if p.strip()]
    if len(parts) > 1:
        return parts
    words = segment.split()
    if len(words) > 1:
        half = len(words) // 2
        return [" ".join(words[:half]), " ".join(words[half:])]
    mid = len(segment) // 2  # one enormous "word": cut by characters
    return [segment[:mid], segment[mid:]]


async def _fit(pieces: list[str], limit: int, count: CountFn) -> list[Chunk]:
    """Pieces each within `limit` tokens, splitting the ones that are not."""
    counts = await count(pieces)
    out: list[Chunk] = []
    for piece, n in zip(pieces, counts, strict=True):
        if n <= limit or len(piece) < 2:
            out.append(Chunk(piece, n))
        else:
            out.extend(await _fit(_split_further(piece), limit, count))
    return out


async def chunk_text(text: str, limit: int, overlap: float, count: CountFn) -> list[Chunk]:
    """Greedy packing of segments into chunks of at most `limit` tokens; each
    chunk starts with the last segments of the previous one, up to `overlap`
    of `limit` tokens, so a passage cut at a boundary is still found whole."""
    pieces = await _fit(segments(text) or [text], limit, count)
    chunks: list[Chunk] = []
    current: list[Chunk] = []
    for piece in pieces:
        size = sum(c.tokens for c in current)
        if current and size + piece.tokens > limit:
            chunks.append(_join(current))
            carry: list[Chunk] = []
            budget = int(limit * overlap)
            for prev in reversed(current):
                if sum(c.tokens for c in carry) + prev.tokens > budget:
                    break
                carry.insert(0, prev)
            # Never carry so much that the new piece does not fit.
            while carry and sum(c.tokens for c in carry) + piece.tokens > limit:
                carry.pop(0)
            current = carry
        current.append(piece)
    if current:
        chunks.append(_join(current))
    return chunks


def _join(parts: list[Chunk]) -> Chunk:
    # Joining adds no tokens for WordPiece/BPE beyond separators; the sum is an
    # upper bound, which is what the limit needs.
    return Chunk("\n\n".join(p.text for p in parts), sum(p.tokens for p in parts))
