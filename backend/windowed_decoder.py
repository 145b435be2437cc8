"""Decoding a window of the image tokens as SAM's decoder decodes the whole image.

SAM's mask decoder costs time linear in the image tokens it runs over (64 x 64 for every prompt),
and it is nearly local: image tokens are updated only by attending to the few prompt and output
tokens, and the upscaling convolutions have stride = kernel, so a pixel's logit depends on the
other image tokens only through the output tokens' attention over them. Training therefore decodes
each object over a window of tokens around it plus ``FAR_ROWS`` rows of tokens drawn from the rest
of the image. In the output tokens' attention each far token weighs as the many tokens it was
drawn from (a log-count bias on its attention logit), so their softmax over window and sample
estimates their softmax over the whole grid: the window decodes in the context the annotator's
whole-image decoder gives it. Without that weight a model trained on windows decoded differently
over the whole image, and its windowed val IoU (0.29) said nothing of its whole-image one (0.11).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

INPUT_SIZE = 1024
"""Side of SAM's padded input frame, in pixels."""
GRID = 64
"""Side of the image-token grid; one token is 16 x 16 input pixels."""
TOKEN = INPUT_SIZE // GRID
MIN_CROP = 8
"""Smallest decoded window, in image tokens (an eighth of the grid's side; chosen on the val frames:
a HeLa cell is ~2 tokens wide, and 8 x 8 windows train twice the steps of 16 x 16 in the same time)."""
FAR_ROWS = 4
"""Rows of far-away image tokens (a window's width each) decoded below each object's window (half
as many tokens as an 8 x 8 window; 2, 6 and 8 rows did worse on the val frames)."""


def window_size(boxes: torch.Tensor) -> int:
    """Side (image tokens) of the windows a step decodes: twice the largest box, ``MIN_CROP`` to 64, a multiple of 4."""
    largest = float((boxes[:, 2:] - boxes[:, :2]).max()) / TOKEN if len(boxes) else 0.0
    return int(min(GRID, max(MIN_CROP, 4 * math.ceil(2 * largest / 4))))


def window_origins(boxes: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(B, 2)`` long (x, y) token origins of ``size``-token windows around each box.

    Centred on the box, moved by up to a quarter window at random when a ``generator`` is
    given (so an object is not always in the middle), kept inside the 64 x 64 grid.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / TOKEN
    if generator is not None:
        centre = centre + (torch.rand(centre.shape, generator=generator, device=boxes.device) - 0.5) * size / 2
    return (centre - size / 2).round().long().clamp(0, GRID - size)


def windowed(grid: torch.Tensor, origins: torch.Tensor, size: int, scale: int) -> torch.Tensor:
    """Per row b, ``grid[b or 0, ..., y:y+size*scale, x:x+size*scale]`` with (x, y) = origins[b] * scale.

    ``grid``: ``(B or 1, ..., H, W)``; returns ``(B, ..., size*scale, size*scale)``, contiguous.
    """
    return _gathered(grid, _window_index(origins, size, scale, grid.shape[-1]))


def far_tokens(origins: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, FAR_ROWS * size)`` long flat indices (``y * 64 + x``) of distinct image tokens
    outside each ``size``-token window, drawn uniformly."""
    grid = torch.arange(GRID, device=origins.device)
    in_x = (grid[None] >= origins[:, :1]) & (grid[None] < origins[:, :1] + size)
    in_y = (grid[None] >= origins[:, 1:]) & (grid[None] < origins[:, 1:] + size)
    outside = ~(in_y[:, :, None] & in_x[:, None, :]).flatten(1)
    # a window of the whole grid leaves nothing outside: its far rows repeat tokens of it
    weights = torch.where(outside.any(1, keepdim=True), outside, True).float()
    return torch.multinomial(weights, FAR_ROWS * size, generator=generator)


def window_with_far_rows(
    grid: torch.Tensor, origins: torch.Tensor, far: torch.Tensor, size: int, scale: int,
) -> torch.Tensor:
    """``windowed(grid, origins, size, scale)`` ``(B, ..., size*scale, size*scale)`` with the ``far``
    tokens' ``scale x scale`` cells of ``grid`` ``(B or 1, ..., 64*scale, 64*scale)`` appended below
    as ``FAR_ROWS`` rows: what ``decode`` decodes for each object."""
    width = grid.shape[-1]
    token_y = (far // GRID).view(len(far), FAR_ROWS, 1, size, 1)
    token_x = (far % GRID).view(len(far), FAR_ROWS, 1, size, 1)
    within = torch.arange(scale, device=far.device)
    # pixel (i, j) of far token (r, c) lands at row r * scale + i, column c * scale + j
    far_index = (token_y * scale + within.view(1, 1, scale, 1, 1)) * width + token_x * scale + within
    far_index = far_index.view(len(far), FAR_ROWS * scale, size * scale)
    return _gathered(grid, torch.cat([_window_index(origins, size, scale, width), far_index], dim=1))


def _window_index(origins: torch.Tensor, size: int, scale: int, width: int) -> torch.Tensor:
    """``(B, size*scale, size*scale)`` flat pixel indices (``y * width + x``) of each origin's window."""
    steps = torch.arange(size * scale, device=origins.device)
    rows, cols = origins[:, 1:] * scale + steps, origins[:, :1] * scale + steps
    return rows[:, :, None] * width + cols[:, None, :]


def _gathered(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, ..., h, w)``: the pixels of ``grid`` ``(B or 1, ..., H, W)`` at flat ``index`` ``(B, h, w)``.

    One gather for the windows and the far cells alike: laying the whole grid out as cells to pick the
    far ones copied all of it first (the targets' 32 x 256 x 256: 5 ms of a 0.23 s step, 1 thread).
    """
    batch, lead = len(index), grid.shape[1:-2]
    flat = grid.flatten(-2).expand(batch, *lead, -1)
    picked = index.reshape(batch, *(1 for _ in lead), -1).expand(-1, *lead, -1)
    return flat.gather(-1, picked).view(batch, *lead, *index.shape[1:])


def decode(
    sam,
    embedding: torch.Tensor,
    origins: torch.Tensor,
    far: torch.Tensor,
    size: int,
    groups: list[tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]],
    mask_prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE batched decoder pass, each prompt over its own window of the image tokens.

    ``groups``: ``(points, boxes)`` pairs as SAM's prompt encoder takes them (points
    ``((b, n, 2) coords, (b, n) labels)`` or None, boxes ``(b, 4)`` or None; input-frame
    coordinates), each encoding to the same number of prompt tokens; ``origins`` ``(B, 2)``
    are the windows' token origins, B the groups' total, ``far`` ``(B, FAR_ROWS * size)`` the
    far-away tokens decoded with each window (``far_tokens``). ``mask_prompts``: ``(B, 4 *
    (size + FAR_ROWS), 4 * size)`` logits laid out as this function returns them and a ``(B,)``
    bool of the prompts that get them as SAM's mask prompt (the others get none). Returns
    ``(B, 4, 4 * (size + FAR_ROWS), 4 * size)`` logits of each window with its far rows below
    and ``(B, 4)`` IoU predictions; mask 0 is SAM's single-mask output, 1-3 its multimask ones.

    Prompt and image positional encodings stay absolute (the window's part of SAM's dense PE).
    """
    decoder = sam.mask_decoder
    encoded = [sam.prompt_encoder(points=points, boxes=boxes, masks=None) for points, boxes in groups]
    sparse = torch.cat([part for part, _ in encoded])
    batch = len(sparse)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(batch, -1, -1), sparse), dim=1)
    src = window_with_far_rows(embedding, origins, far, size, 1)
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    if mask_prompts is None:
        src = src + no_mask
    else:
        logits, used = mask_prompts
        # SAM's mask encoder is local too (stride = kernel, per-pixel norms): a token's dense
        # embedding comes from its own 4 x 4 logits, so the window's logits give the window's tokens
        dense = sam.prompt_encoder.mask_downscaling(logits[:, None])
        src = src + torch.where(used[:, None, None, None], dense, no_mask)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    pos = window_with_far_rows(dense_pe, origins, far, size, 1)
    # from here on SAM's MaskDecoder.predict_masks, minus its repeat of one image per prompt
    hs, src = _transformer(decoder.transformer, src, pos, tokens, _far_key_bias(batch, size, src.device))
    mask_tokens = hs[:, 1:1 + decoder.num_mask_tokens]
    # contiguous: SAM's view of the tokens is channels-last, and its gradient arrives contiguous, so
    # GELU's and the transposed convolutions' backward took a slow mixed-layout path (a step ~12 % slower)
    tokens_as_image = src.transpose(1, 2).reshape(batch, -1, size + FAR_ROWS, size).contiguous()
    upscaled = decoder.output_upscaling(tokens_as_image)
    hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(batch, -1, *upscaled.shape[-2:])
    return masks, decoder.iou_prediction_head(hs[:, 0])


def _far_key_bias(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """``(B, 1, 1, size * size + FAR_ROWS * size)`` additive attention bias of the image tokens as keys:
    0 for the window's, log(outside / far) for each far token, which stands for that many tokens
    outside the window. The output tokens' softmax over the window and the far sample then
    estimates their softmax over the whole 64 x 64 grid, the context the annotator decodes in."""
    outside, far = GRID * GRID - size * size, FAR_ROWS * size
    weight = math.log(outside / far) if outside else -math.inf  # a whole-grid window: far tokens repeat it
    bias = torch.zeros(size * size + far, device=device)
    bias[size * size:] = weight
    return bias.expand(batch, 1, 1, -1)


def _heads(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SAM's ``Attention`` projections of ``(B, n, C)`` queries, keys and values, each split into
    ``(B, heads, n, C' / heads)``."""
    return tuple(attention._separate_heads(proj(x), attention.num_heads)
                 for proj, x in ((attention.q_proj, q), (attention.k_proj, k), (attention.v_proj, v)))


def _attend(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> torch.Tensor:
    """SAM's ``Attention.forward`` with an additive bias on the keys."""
    q, k, v = _heads(attention, q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
    return attention.out_proj(attention._recombine_heads(out))


def _image_to_prompt_tokens(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's ``Attention.forward`` for image tokens ``q`` ``(B, N, C)`` attending to the few prompt and output
    tokens ``k``, ``v`` ``(B, T, C)``, with the scores laid out ``(B, heads, T, N)``.

    The softmax runs over T either way; PyTorch's CPU softmax over a last dimension of T ~ 7 took 4.6 ms
    forward and backward for a step's ``(32, 8, 96, 7)`` scores, over the strided dimension 0.36 ms (1 thread).
    """
    q, k, v = _heads(attention, q, k, v)
    weights = (k @ q.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-2)
    return attention.out_proj(attention._recombine_heads(weights.transpose(-1, -2) @ v))


def _transformer(transformer, image: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
                 key_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer.forward`` with ``key_bias`` on every attention of the tokens to the image."""
    keys = image.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + point_embedding
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q, k = queries + point_embedding, keys + key_pe
        queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, q, k, keys, key_bias))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + point_embedding, keys + key_pe
        keys = layer.norm4(keys + _image_to_prompt_tokens(layer.cross_attn_image_to_token, k, q, queries))
    q, k = queries + point_embedding, keys + key_pe
    queries = transformer.norm_final_attn(queries + _attend(transformer.final_attn_token_to_image, q, k, keys, key_bias))
    return queries, keys
