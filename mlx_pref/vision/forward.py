"""Completion log-probs of a batch for a vision-language model (mlx-vlm's Qwen2-VL family).

A batch is laid out as one row per prompt: the prompt (its image tokens replaced by the
vision tower's features), then each completion that follows it (a pair's chosen and
rejected, or one unpaired completion), then padding on the right. A mask lets each
completion see its prompt and itself, causally, never the other completion; positions are
explicit M-RoPE ids: the prompt's from mlx-vlm's own ``get_input_embeddings`` and each
completion's text positions continuing after the prompt, as if it ran alone. So a pair's
prompt and images run once, the result equals each row run alone (to float rounding), and
the LM head runs only where a completion token is predicted.

Two things mlx-vlm does not do on its own are done here: the 2-D attention mask of its
batched call shapes only the positions, not the attention (a left-padded row reads its
padding), and its language model keeps the positions of the last image call for the next
text-only one. Right padding and explicit positions avoid both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_pref.data.batching import Batch
from mlx_pref.errors import DataError
from mlx_pref.logps import SequenceLogps, row_sums, score_hidden


@dataclass
class Group:
    """One row of the layout: an example's prompt and the batch rows that continue it."""

    example: int
    prompt: np.ndarray
    rows: list[int]
    completions: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + sum(len(c) for c in self.completions)


@dataclass
class Layout:
    groups: list[Group]
    width: int
    segments: np.ndarray
    """(G, T): 0 for prompt tokens, k for the k-th completion, -1 for padding."""
    index: np.ndarray
    targets: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def layout(batch: Batch, share_prompt: bool = True) -> Layout:
    """Where every token goes and which hidden state predicts each scored token."""
    n, b = len(batch.lengths), batch.num_examples
    members = (
        [[i, i + b] for i in range(b)] if batch.paired and share_prompt else [[r] for r in range(n)]
    )
    groups = []
    for rows in members:
        plen = int(batch.prompt_lengths[rows[0]])
        group = Group(rows[0] % b, batch.tokens[rows[0], :plen], rows)
        group.completions = [batch.tokens[r, plen : batch.lengths[r]] for r in rows]
        groups.append(group)
    width = max(g.length for g in groups)
    segments = np.full((len(groups), width), -1, dtype=np.int32)
    index, targets, rows_, cols = [], [], [], []
    for g, group in enumerate(groups):
        plen = len(group.prompt)
        segments[g, :plen] = 0
        at = plen
        for k, (row, completion) in enumerate(zip(group.rows, group.completions), 1):
            segments[g, at : at + len(completion)] = k
            for j, token in enumerate(completion.tolist()):
                index.append(g * width + (plen - 1 if j == 0 else at + j - 1))
                targets.append(token)
                rows_.append(row)
                cols.append(j)
            at += len(completion)
    order = np.lexsort((np.array(cols), np.array(rows_)))
    index_, targets_, rows_a, cols_a = (np.asarray(a)[order] for a in (index, targets, rows_, cols))
    return Layout(groups, width, segments, index_, targets_.astype(np.int32), rows_a, cols_a)


def attention_mask(segments: np.ndarray) -> mx.array:
    """(G, 1, T, T): a token sees the earlier tokens of its own segment, and a completion
    also the whole prompt; padding sees only padding."""
    t = segments.shape[1]
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    same = segments[:, :, None] == segments[:, None, :]
    prompt = (segments[:, None, :] == 0) & (segments[:, :, None] > 0)
    return mx.array(((same & causal) | prompt)[:, None])


def _prompt_features(model: nn.Module, group: Group, images) -> tuple[mx.array, np.ndarray]:
    """The prompt's input embeddings (image features in place) and its (3, P) positions."""
    tokenizer = model.mlx_pref_tokenizer
    ids = mx.array(group.prompt[None].astype(np.int32))
    if not images:
        features = model.get_input_embeddings(ids, None)
    else:
        pixels = tokenizer.pixels(images)
        grid = pixels["image_grid_thw"]
        expected = int((np.asarray(grid).prod(axis=-1) // _merge(model) ** 2).sum())
        found = int((group.prompt == tokenizer.image_token_id).sum())
        if expected != found:
            raise DataError(
                f"a prompt holds {found} image tokens but its images make {expected}: the "
                "processor that tokenized the data is not the model's"
            )
        features = model.get_input_embeddings(ids, pixels["pixel_values"], image_grid_thw=grid)
    positions = np.asarray(features.position_ids)
    if positions.ndim == 2:  # no image: text positions, the same in all three sections
        positions = np.broadcast_to(positions[None], (3, *positions.shape))
    positions = positions[:, 0, :]
    return mx.stop_gradient(features.inputs_embeds[0]), positions


def _merge(model: nn.Module) -> int:
    return int(model.config.vision_config.spatial_merge_size)


def vision_logps(
    model: nn.Module, batch: Batch, *, with_p2: bool = False, share_prompt: bool = True
) -> SequenceLogps:
    """Summed completion log-probs of every row of ``batch`` (see the module's docstring)."""
    plan = layout(batch, share_prompt)
    language = model.language_model
    embed = language.model.embed_tokens
    width = plan.width
    rows, positions, prompts = [], np.zeros((3, len(plan.groups), width), np.int32), {}
    for g, group in enumerate(plan.groups):
        if group.example not in prompts:  # each example's images run once
            images = batch.images[group.example] if batch.images else ()
            prompts[group.example] = _prompt_features(model, group, images)
        prompt, prompt_positions = prompts[group.example]
        pieces, at, after = [prompt], len(group.prompt), int(prompt_positions.max()) + 1
        positions[:, g, :at] = prompt_positions
        for completion in group.completions:
            pieces.append(embed(mx.array(completion.astype(np.int32))))
            positions[:, g, at : at + len(completion)] = np.arange(after, after + len(completion))
            at += len(completion)
        if at < width:
            pieces.append(mx.zeros((width - at, prompt.shape[-1]), dtype=prompt.dtype))
        rows.append(mx.concatenate(pieces))
    hidden = language.model(
        None,
        inputs_embeds=mx.stack(rows),
        mask=attention_mask(plan.segments),
        position_ids=mx.array(positions),
    )
    head = embed.as_linear if language.args.tie_word_embeddings else language.lm_head
    token_logps, p2 = score_hidden(hidden, head, plan.index, plan.targets, with_p2)
    n = len(batch.lengths)
    return SequenceLogps(
        row_sums(token_logps, plan.rows, n), token_logps, plan.rows, plan.cols, n, p2
    )
