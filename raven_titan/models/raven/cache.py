"""Key/value cache across recurrences for generation with the native model (spec §1.11).

Every attention call of one forward pass has its own integer step index, as in Huginn-0125's HF file:

    prelude layer i                       -> i                        (0 .. P-1)
    core layer j of iteration t (0-based) -> P + R*t + j              (P .. P+R*r-1)
    coda layer i                          -> -(i+1)

so a cache for r iterations holds P + R*r + C per-layer key/value tensors, each (B, H, L, D) over the L
positions seen so far (keys already rotated by RoPE at their own position).

Tokens may use different depths (adaptive exit), so a core step index can lack some positions. The lookup
then uses, for that position, its keys/values from the *latest iteration it ran* of the same core layer
(Huginn's `latest-m4` strategy): position p that ran n_p iterations is read at iteration t from iteration
min(t, n_p - 1). At a fixed depth every entry exists and the cache is exact: generating with it equals
recomputing the whole sequence.

Protocol (used by `RavenForCausalLM.embed / core_step / decode` with `cache=`): during one forward pass over
new positions `[length, length + S)` every attention layer calls `update(step_idx, k, v)`, which returns the
committed keys/values of the earlier positions joined with the new ones and keeps the new ones as *pending*
(a second call with the same index replaces them: the coda may run once per iteration to test an exit
criterion). `commit(depth)` then stores the pending entries, records how many core iterations each row ran
for the new positions, and advances `length`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RecurrentKVCache:
    def __init__(self, n_layers_in_prelude: int, n_layers_in_recurrent_block: int) -> None:
        self.P, self.R = n_layers_in_prelude, n_layers_in_recurrent_block
        self.length = 0
        """Committed positions: the next forward pass starts at this position (its RoPE offset)."""
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.depth: Tensor | None = None
        """(B, length) int: core iterations each committed position ran."""
        self._last_k: dict[
            int, Tensor
        ] = {}  # core layer j -> (B, H, length, D) at each position's last iteration
        self._last_v: dict[int, Tensor] = {}
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}

    # ---- step indices ---------------------------------------------------------------------------------------
    def prelude_index(self, i: int) -> int:
        return i

    def core_index(self, iteration: int, j: int) -> int:
        return self.P + self.R * iteration + j

    @staticmethod
    def coda_index(i: int) -> int:
        return -(i + 1)

    def _core_position(self, step_idx: int) -> tuple[int, int] | None:
        """(iteration, core layer) of a core step index; None for prelude and coda indices."""
        if step_idx < self.P:
            return None
        return divmod(step_idx - self.P, self.R)

    # ---- the attention-side call ----------------------------------------------------------------------------
    def update(self, step_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values (B, H, length + S, D) for attention at `step_idx`: the committed positions (filled by
        the latest-iteration rule) then the S new ones, which are kept as pending until `commit`."""
        self._pending[step_idx] = (k, v)
        if self.length == 0:
            return k, v
        old_k, old_v = self._lookup(step_idx)
        return torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)

    def _lookup(self, step_idx: int) -> tuple[Tensor, Tensor]:
        core = self._core_position(step_idx)
        stored_k, stored_v = self.keys.get(step_idx), self.values.get(step_idx)
        if core is None:
            return stored_k, stored_v
        t, j = core
        last_k, last_v = self._last_k[j], self._last_v[j]
        ran = self.depth > t  # (B, length): positions that have their own entry at iteration t
        if stored_k is None:
            return last_k, last_v
        if stored_k.shape[2] < self.length:  # positions committed after this index was last reached
            stored_k, stored_v = _pad_positions(stored_k, self.length), _pad_positions(stored_v, self.length)
        if bool(ran.all()):
            return stored_k, stored_v
        mask = ran[:, None, :, None]
        return torch.where(mask, stored_k, last_k), torch.where(mask, stored_v, last_v)

    # ---- after a forward pass -------------------------------------------------------------------------------
    def commit(self, depth: Tensor | int) -> None:
        """Store the pending entries of the new positions; `depth` (B,) or an int: core iterations each row
        ran for them (>= 1)."""
        if not self._pending:
            raise RuntimeError("commit() without a forward pass through the cache")
        k0, _ = next(iter(self._pending.values()))
        B, S = k0.shape[0], k0.shape[2]
        depth = torch.as_tensor(depth, device=k0.device).expand(B).to(torch.long)
        if int(depth.min()) < 1:
            raise ValueError("every row must run at least one core iteration before commit")
        for step_idx, (k, v) in self._pending.items():
            if k.shape[2] != S:
                raise RuntimeError("pending cache entries of different lengths; one forward pass per commit")
            if step_idx in self.keys:
                old_k, old_v = self.keys[step_idx], self.values[step_idx]
                if old_k.shape[2] < self.length:
                    old_k, old_v = _pad_positions(old_k, self.length), _pad_positions(old_v, self.length)
                k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            elif self.length:
                k, v = (
                    _pad_positions(k, self.length, before=True),
                    _pad_positions(v, self.length, before=True),
                )
            self.keys[step_idx], self.values[step_idx] = k, v
        # each row's last iteration, per core layer, for the new positions
        for j in range(self.R):
            new_k, new_v = [], []
            for b in range(B):
                step = self.core_index(int(depth[b]) - 1, j)
                k, v = self._pending[step]
                new_k.append(k[b])
                new_v.append(v[b])
            new_k, new_v = torch.stack(new_k), torch.stack(new_v)
            if j in self._last_k:
                new_k = torch.cat([self._last_k[j], new_k], dim=2)
                new_v = torch.cat([self._last_v[j], new_v], dim=2)
            self._last_k[j], self._last_v[j] = new_k, new_v
        new_depth = depth[:, None].expand(B, S)
        self.depth = new_depth if self.depth is None else torch.cat([self.depth, new_depth], dim=1)
        self.length += S
        self._pending = {}

    def discard(self) -> None:
        """Forget the pending entries (a forward pass whose positions are not to be kept)."""
        self._pending = {}

    def memory_mib(self) -> float:
        tensors = [*self.keys.values(), *self.values.values(), *self._last_k.values(), *self._last_v.values()]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _pad_positions(t: Tensor, length: int, before: bool = False) -> Tensor:
    """Zero-pad (B, H, L, D) along the positions to `length` (after the existing ones, or before them)."""
    missing = length - t.shape[2] if not before else length
    pad = t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3])
    return torch.cat([pad, t], dim=2) if before else torch.cat([t, pad], dim=2)


__all__ = ["RecurrentKVCache"]
