"""Write a GGUF's weights at F16: the same network, about four times the bytes of Q4.

The scheduler's memory target (sequential RSS <= 0.6x resident) depends on the model set:
it can hold only when no model is much more than half of the set's memory. No
board-sized reranker can be fetched here (no model hub), so the benchmark can stand one
in by widening SmolLM2-135M from Q4_1 to F16 (98 -> ~270 MB, like gemma-3-270m beside it),
which is also the precision an RKNN graph runs at on the NPU. Scores and speed differ
from the Q4_1 file; the scheduler's decisions do not depend on either.

Usage: python bench/widen_gguf.py SRC.gguf DST.gguf
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import llama_cpp


def widen(src: Path, dst: Path, ftype: int = llama_cpp.LLAMA_FTYPE_MOSTLY_F16) -> None:
    """`dst`: `src` at F16 (or `ftype`, e.g. LLAMA_FTYPE_ALL_F32)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True  # the source is already quantized
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def main() -> int:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    widen(src, dst)
    print(f"{dst}: {dst.stat().st_size / 2**20:.0f} MB (from {src.stat().st_size / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
