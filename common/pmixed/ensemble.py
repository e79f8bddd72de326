"""The PMixED ensemble forward: N members and the public model p0 in one pass over shared blocks.

Members are the full model with one data owner's adapter plugged in, so they differ only in the
adapter blocks (bottom k and top k); every other block, the embeddings, the final norm and the head
are the same weights (in ULT ``carry_embeddings`` mode the embedding and head are per member too,
applied per row: a lookup, and the head on one position per row). One decoding step therefore runs:

    embeddings once -> bottom adapter blocks -> shared blocks ONCE over all rows
                    -> top adapter blocks -> final norm + head once, on the last positions

(adapter blocks: once over all LoRA rows with per-row low-rank updates; a full-adapter member's
own block copy on its rows only)

where a "row" is p0 or one sampled member. Rows are *packed* along the sequence dimension rather
than stacked along the batch: PMixED samples a fresh subset S every token, so a member's KV cache
lags behind by however many tokens it sat out, and rows need different numbers of new tokens (p0
always one; a member first sampled after 40 tokens, 40). Packing the new tokens of all rows into
one sequence, with a block-diagonal causal mask that lets each token see only its own row's cache
and tokens, processes exactly the tokens each row lacks: no padding, no recomputation. Each row
keeps its own KV cache per block (caches of shared blocks differ per row too, since the hidden
states do).

Full adapter blocks of one member run on that member's segment only. LoRA members share ONE copy of
each adapter block whose linear layers add each token's own low-rank update (``_RowLoRA``), so that
block, too, runs once over p0 and every LoRA row; the base weight is read once per step instead of
once per sampled member, and N members cost N sets of LoRA factors instead of N block copies.

What differs between families around the blocks (how positions enter, what sits between the last
block and the head) is ``common.families.Stem``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks, stem_of
from privtune.common.offsite.adapter import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, AdapterManifest
from privtune.common.offsite.plugin import plug_in
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.mechanism import next_token
from privtune.common.pmixed.projection import DEFAULT_TOL

PUBLIC = -1
"""Row key of the public model p0; members are 0..N-1."""


@dataclass(frozen=True)
class MemberAdapter:
    """One ensemble member: a data owner's adapter state and its manifest."""

    name: str
    state: Mapping[str, torch.Tensor]
    manifest: AdapterManifest


class _PackedCache:
    """What an attention layer sees as its KV cache for one group of rows in one step.

    HF attention calls ``update(k, v, layer_idx)`` and attends over what it returns; here that is
    the group's past keys (rows concatenated along the sequence) followed by the new ones. The new
    keys are kept so the session can append each row's part to that row's own cache.
    """

    def __init__(self, layer_idx: int, past: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.layer_idx = layer_idx
        self.past = past
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        if layer_idx != self.layer_idx:
            raise AssertionError(f"block {self.layer_idx} asked for the cache of layer {layer_idx}")
        self.new = (keys, values)
        if self.past is None:
            return keys, values
        return torch.cat([self.past[0], keys], dim=2), torch.cat([self.past[1], values], dim=2)


class _RowLoRA(nn.Module):
    """A linear layer plus per-row LoRA: tokens of member m get ``scale_m * B_m A_m x`` added.

    Which tokens belong to which member is set per call by :meth:`_RoutedBlock.route`; tokens of
    rows without factors here (p0, members that do not adapt this layer) get the base layer only.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.plan: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        for row, index in self.plan:  # tokens are along dim -2: (1, T, in), or (T, in) in OPT's MLP
            if row in self.factors:
                lora_a, lora_b, scale = self.factors[row]
                part = x.index_select(-2, index)
                out.index_add_(-2, index, (part @ lora_a.T @ lora_b.T) * scale)
        return out


class _RoutedBlock:
    """One copy of a base block shared by every LoRA member adapting it (see ``_RowLoRA``)."""

    def __init__(self, base_block: nn.Module) -> None:
        self.block = copy.deepcopy(base_block).eval()
        self.layers: dict[str, _RowLoRA] = {}

    def add(self, row: int, state: Mapping[str, torch.Tensor], prefix: str, scale: float) -> None:
        """Register member ``row``'s factors for this block (``state`` names ``<prefix><path>.lora_A``)."""
        for name, lora_a in state.items():
            if not (name.startswith(prefix) and name.endswith(".lora_A")):
                continue
            path = name[len(prefix) :].removesuffix(".lora_A")
            if path not in self.layers:
                self.layers[path] = _RowLoRA(self.block.get_submodule(path))
                self.block.set_submodule(path, self.layers[path])
            dtype = self.layers[path].layer.get_parameter("weight").dtype
            lora_b = state[name.removesuffix("_A") + "_B"]
            self.layers[path].factors[row] = (lora_a.to(dtype), lora_b.to(dtype), scale)

    def route(self, plan: list[tuple[int, torch.Tensor]]) -> None:
        """(row, positions of its tokens in the block's input) for the next call."""
        for layer in self.layers.values():
            layer.plan = plan


class Ensemble:
    """A base model plus N members' adapter blocks; shared blocks are held once.

    ``members`` are plugged in one at a time with ``plug_in`` (which checks each adapter fits this
    model) and only their adapter blocks are kept, plus, for members that carry their own
    embeddings (ULT ``carry_embeddings`` mode), their input embedding and head. Those are applied
    per row (a lookup, and the head on one position per row), so the shared blocks still run once.

    Such members' ids are in the federation key's order, and so must p0's be: ``public_embeddings``
    is the base model's own embedding rows relabelled by a key holder (:mod:`common.ult.relabel`,
    which checks they are exactly the public rows). Mixing a keyed member with the base model's
    public-order rows would average distributions over different vocabularies, so that is refused.
    """

    def __init__(
        self,
        base_model: nn.Module,
        members: Sequence[MemberAdapter],
        public_embeddings: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not members:
            raise PrivtuneError("a PMixED ensemble needs at least one member adapter")
        self.public_pair = _public_pair(base_model, members, public_embeddings)
        self.base = base_model.eval()
        self.stem = stem_of(base_model)
        self.base_blocks = list(get_blocks(base_model))
        self.names = [m.name for m in members]
        # own_blocks[member][block index] -> the block that member's rows run through there
        self.own_blocks: list[dict[int, nn.Module]] = []
        # routed[block index] -> the block copy shared by LoRA members (and p0) at that index
        self.routed: dict[int, _RoutedBlock] = {}
        # own_embeddings[member] -> (input embedding, head) of members that carry them
        self.own_embeddings: dict[int, tuple[nn.Module, nn.Module]] = {}
        for row, member in enumerate(members):
            plugged = plug_in(base_model, member.state, member.manifest)  # checks the adapter fits
            blocks = get_blocks(plugged)
            indices = sorted(set(member.manifest.indices))
            if member.manifest.mode == "lora":
                for i in indices:
                    self.routed.setdefault(i, _RoutedBlock(self.base_blocks[i])).add(
                        row, member.state, f"block.{i}.", member.manifest.scale
                    )
                self.own_blocks.append({i: self.routed[i].block for i in indices})
            else:
                self.own_blocks.append({i: blocks[i].eval() for i in indices})
            if member.manifest.carry_embeddings:
                # transformers methods, typed as tensors by nn.Module.__getattr__
                self.own_embeddings[row] = (
                    plugged.get_input_embeddings(),  # type: ignore[operator]
                    plugged.get_output_embeddings(),  # type: ignore[operator]
                )
            del plugged
        modules = [
            self.base,
            *(b for own in self.own_blocks for b in own.values()),
            *(m for pair in self.own_embeddings.values() for m in pair),
        ]
        for module in modules:
            module.requires_grad_(False)

    @property
    def n_members(self) -> int:
        return len(self.own_blocks)

    def extra_bytes(self) -> int:
        """Bytes held on top of the base model: block copies, LoRA factors, carried embeddings, keyed p0."""
        tensors: list[torch.Tensor] = [
            t for own in self.own_blocks for block in own.values() for t in block.parameters()
        ]
        tensors += [
            t
            for pair in [*self.own_embeddings.values(), *([self.public_pair] if self.public_pair else [])]
            for module in pair
            for t in module.parameters()
        ]
        tensors += [
            t
            for routed in self.routed.values()
            for layer in routed.layers.values()
            for a, b, _ in layer.factors.values()
            for t in (a, b)
        ]
        return unique_bytes(tensors, exclude=self.base.parameters())

    @property
    def max_positions(self) -> int:
        return self.stem.max_positions

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move every weight held (base, block copies, LoRA factors, embeddings) to ``device`` in ``dtype``.

        An ensemble is built on the host in the base model's own precision, where ``plug_in`` can
        check each member against the digest of the base weights, and moved afterwards.
        """
        pairs = [*self.own_embeddings.values(), *([self.public_pair] if self.public_pair else [])]
        modules = [self.base, *(b for own in self.own_blocks for b in own.values()), *(m for p in pairs for m in p)]
        for module in modules:
            module.to(device, dtype)
        for layer in (layer for routed in self.routed.values() for layer in routed.layers.values()):
            layer.factors = {
                row: (a.to(device, dtype), b.to(device, dtype), s) for row, (a, b, s) in layer.factors.items()
            }

    def placement(self) -> contextlib.AbstractContextManager:
        """Makes new tensors (the packing's index tensors) on the model's device; nothing on the CPU,
        where a default-device mode would only add overhead to every torch call."""
        device = next(self.base.parameters()).device
        return contextlib.nullcontext() if device.type == "cpu" else device

    def block_for(self, row: int, index: int) -> nn.Module:
        """The block a row runs through: its own, else the shared LoRA copy (no factors: the base
        function, but batched with the LoRA rows), else the base block."""
        own = {} if row == PUBLIC else self.own_blocks[row]
        if index in own:
            return own[index]
        return self.routed[index].block if index in self.routed else self.base_blocks[index]

    def embeddings_for(self, row: int) -> tuple[nn.Module, nn.Module]:
        """(input embedding, head) of a row: the member's own if it carries them, p0's keyed ones, or the base's."""
        if row in self.own_embeddings:
            return self.own_embeddings[row]
        if row == PUBLIC and self.public_pair is not None:
            return self.public_pair
        return self.base.get_input_embeddings(), self.base.get_output_embeddings()  # type: ignore[operator]

    def session(self, prompt: Sequence[int]) -> EnsembleSession:
        return EnsembleSession(self, prompt)


def unique_bytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages among ``tensors``, leaving out those of ``exclude``."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def check_p0_order(members: Sequence[MemberAdapter], keyed_p0: bool) -> None:
    """Refuse an ensemble whose p0 and members are not over the same ids (keyed p0 iff keyed members)."""
    carried = {m.manifest.carry_embeddings for m in members}
    if len(carried) > 1:
        raise PrivtuneError(
            "some members carry their own (ULT-keyed) embeddings and some do not: they come from "
            "different federations and cannot form one ensemble"
        )
    if carried == {False} and keyed_p0:
        raise PrivtuneError(
            "keyed public embeddings were given, but the members use the base model's own "
            "embeddings (no ULT key): serve without them"
        )
    if carried == {True} and not keyed_p0:
        raise PrivtuneError(
            "the members are ULT-keyed (their embeddings are in the federation key's id order) but p0, the public "
            "model, is in the public order; a key holder makes p0's rows in the key's order with 'privtune ult "
            "keyed-public', and the service takes them with --public-embeddings FILE"
        )


def _public_pair(
    base: nn.Module, members: Sequence[MemberAdapter], public_embeddings: Mapping[str, torch.Tensor] | None
) -> tuple[nn.Module, nn.Module] | None:
    """p0's (input embedding, head) when the members are ULT-keyed; None when p0 is the base as it is."""
    check_p0_order(members, public_embeddings is not None)
    if public_embeddings is None:
        return None
    embed = copy.deepcopy(base.get_input_embeddings())  # type: ignore[operator]  # a transformers method
    embed.weight = nn.Parameter(public_embeddings[INPUT_EMBEDDINGS].to(embed.weight.dtype), requires_grad=False)
    head = copy.deepcopy(base.get_output_embeddings())  # type: ignore[operator]
    head.weight = (
        embed.weight
        if OUTPUT_EMBEDDINGS not in public_embeddings
        else nn.Parameter(public_embeddings[OUTPUT_EMBEDDINGS].to(head.weight.dtype), requires_grad=False)
    )
    return embed.eval(), head.eval()


class EnsembleSession:
    """One token sequence being decoded: the tokens so far and every row's KV cache of them.

    Caches fill lazily: a row processes the tokens it has not seen the next time it is asked for
    logits, so members that Poisson subsampling leaves out cost nothing until they are sampled.
    """

    def __init__(self, ensemble: Ensemble, prompt: Sequence[int]) -> None:
        if len(prompt) == 0:
            raise PrivtuneError("the prompt is empty; give at least one token (e.g. the tokenizer's bos token)")
        self.ensemble = ensemble
        self.tokens: list[int] = []
        self.extend(prompt)
        # cache[row][block index] = (keys, values), each (1, kv_heads, cached length, head_dim)
        self._cache: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._cached_len: dict[int, int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        limit = self.ensemble.max_positions
        if limit and len(self.tokens) + len(tokens) > limit:
            raise PrivtuneError(
                f"the sequence would reach {len(self.tokens) + len(tokens)} tokens, beyond the model's "
                f"{limit} positions; use a shorter prompt or fewer new tokens"
            )
        self.tokens.extend(int(t) for t in tokens)

    def cached_length(self, row: int) -> int:
        return self._cached_len.get(row, 0)

    def _rows(self, members: Sequence[int]) -> list[int]:
        rows = [PUBLIC, *(int(m) for m in members)]
        if len(set(rows)) != len(rows) or any(not 0 <= m < self.ensemble.n_members for m in rows[1:]):
            raise ValueError(
                f"members must be distinct indices in 0..{self.ensemble.n_members - 1}, got {list(members)}"
            )
        return rows

    @torch.no_grad()
    def logits(self, members: Sequence[int]) -> torch.Tensor:
        """Next-token logits ``(1 + len(members), V)``: row 0 is p0, then ``members`` in order."""
        rows = self._rows(members)
        with self.ensemble.placement():
            last_hidden = self._advance(rows, len(self.tokens))
        ens = self.ensemble
        if not ens.own_embeddings:
            return ens.stem.logits(last_hidden, ens.embeddings_for(PUBLIC)[1])
        return torch.cat(
            [ens.stem.logits(last_hidden[i : i + 1], ens.embeddings_for(row)[1]) for i, row in enumerate(rows)]
        )

    @torch.no_grad()
    def prefill(self, members: Sequence[int]) -> None:
        """Cache all but the last token for p0 and ``members`` in ONE packed pass; releases nothing.

        Worth it before a long generation, when most members will be sampled at some point: one
        pass over (1 + N) x prompt tokens instead of a catch-up pass each time a member first joins S.
        """
        rows = [r for r in self._rows(members) if self.cached_length(r) < len(self.tokens) - 1]
        if rows:
            with self.ensemble.placement():
                self._advance(rows, len(self.tokens) - 1)

    def _advance(self, rows: list[int], n: int) -> torch.Tensor:
        """Feed each row the tokens it lacks of ``tokens[:n]``; returns each row's last hidden state."""
        ens = self.ensemble
        starts = [min(self.cached_length(r), n - 1) for r in rows]
        for row, start in zip(rows, starts):
            if start < self.cached_length(row):  # asked again at the same length: recompute the last token
                self._crop(row, start)
        segments = [(start, n) for start in starts]
        seg_rows = torch.cat([torch.full((n - s,), i) for i, (s, _) in enumerate(segments)])
        positions = torch.cat([torch.arange(s, n) for s, _ in segments]).unsqueeze(0)
        ids = torch.tensor([self.tokens[p] for p in positions[0].tolist()]).unsqueeze(0)
        token_slices = []
        offset = 0
        for s, e in segments:
            token_slices.append(torch.arange(offset, offset + e - s))
            offset += e - s
        token_embeds = torch.cat([ens.embeddings_for(row)[0](ids[:, sl]) for row, sl in zip(rows, token_slices)], dim=1)
        hidden = ens.stem.embed(token_embeds, positions)
        extra = ens.stem.block_kwargs(hidden, positions)
        masks: dict[tuple[int, ...], torch.Tensor] = {}
        for index in range(len(ens.base_blocks)):
            groups: dict[int, list[int]] = {}
            modules: dict[int, nn.Module] = {}
            for i, row in enumerate(rows):
                module = ens.block_for(row, index)
                groups.setdefault(id(module), []).append(i)
                modules[id(module)] = module
            out = torch.empty_like(hidden)
            routed = ens.routed.get(index)
            for key, members_in_group in groups.items():
                idx = torch.cat([token_slices[i] for i in members_in_group])
                if routed is not None and modules[key] is routed.block:
                    routed.route(self._plan(rows, members_in_group, token_slices))
                group = tuple(members_in_group)
                if group not in masks:
                    masks[group] = self._mask(group, rows, seg_rows, positions[0], idx, hidden.dtype)
                cache = _PackedCache(index, self._past(index, [rows[i] for i in group]))
                kwargs = {k: tuple(t.index_select(1, idx) for t in v) for k, v in extra.items()}
                try:
                    result = modules[key](
                        hidden.index_select(1, idx),
                        attention_mask=masks[group],
                        past_key_values=cache,
                        use_cache=True,
                        **kwargs,
                    )
                finally:
                    if routed is not None:
                        routed.route([])  # a plan is for one call; a stray later call gets no member's update
                out[:, idx] = result[0] if isinstance(result, tuple) else result
                if cache.new is None:
                    raise PrivtuneError(
                        f"block {index} wrote no keys and values to its KV cache; its attention is unsupported"
                    )
                self._store(index, [rows[i] for i in group], [n - starts[i] for i in group], cache.new)
            hidden = out
        last = torch.tensor([int(sl[-1]) for sl in token_slices])
        for row in rows:
            self._cached_len[row] = n
        return hidden[0, last]

    @staticmethod
    def _plan(rows: list[int], group: list[int], token_slices: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """Each row of a group with the positions of its tokens in the group's packed input."""
        plan, offset = [], 0
        for i in group:
            count = len(token_slices[i])
            plan.append((rows[i], torch.arange(offset, offset + count)))
            offset += count
        return plan

    def _mask(self, group, rows, seg_rows, positions, idx, dtype) -> torch.Tensor:
        """Additive mask (1, 1, new, past + new): a token sees its own row's earlier tokens only."""
        q_row, q_pos = seg_rows[idx], positions[idx]
        past_row = torch.cat([torch.full((self.cached_length(rows[i]),), i) for i in group])
        past_pos = torch.cat([torch.arange(self.cached_length(rows[i])) for i in group])
        k_row, k_pos = torch.cat([past_row, q_row]), torch.cat([past_pos, q_pos])
        allowed = (q_row[:, None] == k_row[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

    def _past(self, index: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        parts = [self._cache[r][index] for r in rows if self.cached_length(r) > 0]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    def _store(self, index: int, rows: list[int], counts: list[int], new: tuple[torch.Tensor, torch.Tensor]) -> None:
        keys, values = new
        offset = 0
        for row, count in zip(rows, counts):
            k, v = keys[:, :, offset : offset + count], values[:, :, offset : offset + count]
            offset += count
            per_block = self._cache.setdefault(row, {})
            if index in per_block:
                old_k, old_v = per_block[index]
                k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            per_block[index] = (k, v)

    def _crop(self, row: int, length: int) -> None:
        self._cache[row] = {i: (k[:, :, :length], v[:, :, :length]) for i, (k, v) in self._cache.get(row, {}).items()}
        self._cached_len[row] = length

    def probs(self, members: Sequence[int]) -> torch.Tensor:
        """Next-token distributions in float64, rows as in :meth:`logits`."""
        return torch.softmax(self.logits(members).to(torch.float64), dim=-1)

    def private_next_token(
        self, budget: PMixedBudget, rng: np.random.Generator | None = None, tol: float = DEFAULT_TOL
    ) -> int:
        """One PMixED release (``common.pmixed.next_token``) over this session; does NOT append the token.

        Every member's distribution is computed for every token, whichever S the query draws, so
        the work (and the time) of a query does not depend on S; it costs N member rows where an
        S-only forward would cost |S| on average qN. Charging the ledger is the caller's job and
        must happen before the token leaves the process.
        """
        if budget.n_members != self.ensemble.n_members:
            raise PrivtuneError(
                f"the budget was set up for {budget.n_members} members but the ensemble has {self.ensemble.n_members}"
            )
        probs = self.probs(range(self.ensemble.n_members)).cpu()  # the exact sampler reads host memory
        return next_token(probs[0], probs[1:], budget, rng, tol).token
