"""Host memory of a search process: what glibc's allocator keeps resident, and how little of it a search needs.

Measured on Gemma 3 270M (1066 MB of base + deltas) on this CPU, peak RSS less the runtime's:
- Loading a 262k-token tokenizer makes ~0.5 GB of small allocations and leaves ~370 MB of free holes in the heap
  it used. Activations allocated later from the same heap land in those holes and keep them resident: trials
  peaked 100-150 MB higher. `load_tokenizer` loads it on a thread of its own, which glibc serves from an arena
  of its own, so the model's tensors never touch those holes.
- By default glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so a
  forward's activations come from the heap, freed between allocations that live longer: the heap fragments and
  stays resident (a gradient fit's heap grew to ~1.2 GB with ~0.9 GB of it free). `mmap_threshold` fixes the
  threshold (`SEARCH_MMAP_THRESHOLD` for trials, `FIT_MMAP_THRESHOLD` within a backward pass): larger blocks get
  their own mapping, returned to the OS when freed, at the cost of page faults when they are touched again.
Elsewhere than glibc (macOS, musl) these are no-ops: the memory is reused by the process, just not returned.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter number
SEARCH_MMAP_THRESHOLD = 1 << 20  # trials: most of a batch's activations are larger (1.33x trial time here)
FIT_MMAP_THRESHOLD = 64 << 10    # a backward pass over a few rows: smaller blocks, more of them kept across it


@functools.cache
def _libc():  # once: glibc, or None elsewhere
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def free_host_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc's malloc_trim): what a dropped tokenizer
    freed (many small Rust allocations) otherwise stays in the process's resident memory."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def set_mmap_threshold(nbytes: int) -> None:
    """Blocks of at least `nbytes` get a mapping of their own from now on (and glibc stops moving the threshold)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, int(nbytes))


@contextlib.contextmanager
def mmap_threshold(nbytes: int, after: int = SEARCH_MMAP_THRESHOLD):
    """Within: `nbytes` as the mmap threshold; after: `after` (glibc cannot tell the one it had), freed pages
    returned."""
    set_mmap_threshold(nbytes)
    try:
        yield
    finally:
        set_mmap_threshold(after)
        free_host_memory()


def load_tokenizer(path: Path | str):
    """AutoTokenizer.from_pretrained(path) on a thread of its own: its allocations, and the holes they leave, stay
    in that thread's malloc arena, out of the one the model's tensors come from. Errors are raised here."""
    from transformers import AutoTokenizer

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-tokenizer") as pool:
        return pool.submit(AutoTokenizer.from_pretrained, path).result()


class HeldTokenizer:
    """A model folder's tokenizer, loaded when first asked for (load_tokenizer) and dropped by `release` when nothing
    needs it (a search whose trials run on token ids): asked for again, it is loaded again. The session holds it and
    shares it with what it loads (merge.WeightedDeltas), so there is one copy to drop."""

    def __init__(self, path: Path | str):
        self.path, self._tokenizer = path, None

    def get(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    def release(self) -> None:
        self._tokenizer = None
