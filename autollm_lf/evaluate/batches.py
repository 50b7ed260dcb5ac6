"""Batches planned by length, with the prompt prefix the rows of a batch share computed once."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: importing this module stays light
    pass


MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth the cache's copy per row


CALL_COST = 256        # a forward call's fixed cost, in positions: keeps batches from getting needlessly small


def _common(a: list[int], b: list[int]) -> int:
    """Length of the prefix a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving each prompt's last token out (its logits are scored)."""
    first = prompts[0]
    return min([_common(first, p) for p in prompts[1:]] + [len(p) - 1 for p in prompts])


def prefix_worth_sharing(rows: int, shared: int) -> int:
    """`shared` when running it once saves positions, else 0. All the prefixes of a pass run in one forward
    call, so a prefix costs its own positions and no call of its own."""
    return shared if shared >= MIN_SHARED_PREFIX and rows > 1 else 0


def plan_batches(encoded: list[tuple[list[int], list[int]]], order: list[int],
                 batch_size: int) -> tuple[float, list[list[int]]]:
    """Cut `order` into consecutive batches of at most batch_size rows so that one teacher-forced pass per batch
    computes the fewest positions: each batch costs its shared prompt prefix once (where prefix_worth_sharing;
    an upper bound, as batches with the same prefix share one copy) plus rows x (longest row - prefix), plus
    CALL_COST per forward call. Dynamic programming over the cut points; the shared prefix of consecutive rows
    is the minimum of their adjacent common prefixes."""
    n = len(order)
    adjacent = [_common(encoded[order[i]][0], encoded[order[i + 1]][0]) for i in range(n - 1)]
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        shared, longest, shortest_prompt = 1 << 30, 0, 1 << 30
        for i in range(j - 1, max(j - batch_size, 0) - 1, -1):
            p, r = encoded[order[i]]
            longest, shortest_prompt = max(longest, len(p) + len(r) - 1), min(shortest_prompt, len(p))
            if i < j - 1:
                shared = min(shared, adjacent[i])
            prefix = prefix_worth_sharing(j - i, min(shared, shortest_prompt - 1))
            cost = best[i] + (j - i) * (longest - prefix) + CALL_COST + prefix
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return best[n], batches[::-1]
