"""Prov-GigaPath's slide encoder (``gigapath.slide_encoder``) on longnet: no flash-attn, timm or network.

:func:`create_model` builds ``LongNetViT`` with GigaPath's module names and
loads ``slide_encoder.pth`` unchanged (``torch.load(path)["model"]``), so its
state-dict keys match with none missing or unexpected. ``forward(x, coords,
all_layer_embed=False)`` returns what GigaPath's does: a list with one
(B, E) slide embedding, or one per layer input/output with
``all_layer_embed``.

Layouts: ``x`` (B, L, in_chans) tile embeddings; ``coords`` (B, L, 2) tile
pixel coordinates (x, y) at level 0; ``padding_mask`` (B, L) bool, True =
padding tile (a longnet extension: GigaPath accepts batch size 1 only).

Positions: GigaPath looks rows up in a fixed (1 + 1000^2, E) 2-D sin-cos
table (3 GB in fp32 at E = 768). The same rows are computed here from the
coordinates on the fly (float64, rounded to float32 like the table), so no
table exists. See docs/gigapath.md for what is and is not identical.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .torchscale import make_longnet_from_name

__all__ = ["LongNetViT", "PatchEmbed", "create_model", "sincos_position_rows", "optimal_segment_length",
           "pad_slides", "MODEL_ARCHS"]


def optimal_segment_length(max_wsi_size: int = 262144, tile_size: int = 256) -> str:
    """GigaPath's segment lengths: 5 log-spaced from 1024 to the tile count of the largest slide.

    For the defaults: "[1024, 5792, 32768, 185363, 1048576]" (as a string, as GigaPath passes it).
    """
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exponents = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), 5)
    return str([int(s) for s in np.power(2, exponents).astype(int)])


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M, dim) sin | cos features of float64 positions (M,), frequencies 1 / 10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    angle = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], 1)


def sincos_position_rows(index: Tensor, embed_dim: int, grid: int) -> Tensor:
    """Rows ``index`` of GigaPath's position table (``get_2d_sincos_pos_embed(E, grid, cls_token=True)``), float32.

    ``index`` (any shape) in [0, grid^2]: row 0 is the CLS row (zeros); row
    i > 0 is grid cell i - 1 = a * grid + b, embedded as
    [sincos(b) (E/2 features), sincos(a) (E/2)], as the table lays it out.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos positions, got {embed_dim}")
    flat = index.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > grid * grid):
        raise ValueError(f"tile positions must lie in the {grid}x{grid} grid (index 0..{grid * grid}), got "
                         f"{int(flat.min())}..{int(flat.max())}: check coords and tile_size")
    cell = (flat - 1).clamp(min=0)
    a, b = (cell // grid).double(), (cell % grid).double()
    rows = torch.cat([_sincos_1d(embed_dim // 2, b), _sincos_1d(embed_dim // 2, a)], 1)
    rows = rows.float().masked_fill((flat == 0)[:, None], 0.0)
    return rows.reshape(*index.shape, embed_dim)


class PatchEmbed(nn.Module):
    """GigaPath's tile-embedding projection: Linear(in_chans, E) then an identity norm."""

    def __init__(self, in_chans: int = 1536, embed_dim: int = 768, norm_layer=None, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_chans, embed_dim, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class LongNetViT(nn.Module):
    """GigaPath's slide encoder: tile projection, 2-D sin-cos positions, CLS token, LongNet encoder, norm.

    Arguments as GigaPath's; ``encoder_overrides`` (a longnet extension)
    replaces fields of the named encoder config, for small models of the
    same structure.
    """

    def __init__(self, in_chans: int = 1536, embed_dim: int = 256, depth: int = 12, slide_ngrids: int = 1000,
                 tile_size: int = 256, max_wsi_size: int = 262144, norm_layer=nn.LayerNorm,
                 global_pool: bool = False, dropout: float = 0.25, drop_path_rate: float = 0.1,
                 encoder_overrides: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.tile_size, self.slide_ngrids, self.embed_dim = tile_size, slide_ngrids, embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder_name = f"LongNet_{depth}_layers_{embed_dim}_dim"
        if kwargs.get("mlp_ratio", 4.0) != 4.0:
            self.encoder_name += f"_mlp{kwargs.get('mlp_ratio')}"
        self.segment_length = optimal_segment_length(max_wsi_size, tile_size)
        overrides = dict(encoder_layers=depth, encoder_embed_dim=embed_dim, **encoder_overrides) \
            if encoder_overrides else {}
        self.encoder = make_longnet_from_name(self.encoder_name, drop_path_rate=drop_path_rate, dropout=dropout,
                                              segment_length=self.segment_length, **overrides)
        self.norm = norm_layer(embed_dim)
        self.global_pool = global_pool
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.xavier_uniform_(self.patch_embed.proj.weight)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    def coords_to_pos(self, coords: Tensor, tile_size: int = 256) -> Tensor:
        """(B, L) table rows of (B, L, 2) coordinates: floor(x / t) * grid + floor(y / t) + 1."""
        cell = torch.floor(coords / tile_size)
        return (cell[..., 0] * self.slide_ngrids + cell[..., 1]).long() + 1

    def _tokens(self, x: Tensor, coords: Tensor) -> Tensor:
        """(B, 1 + L, E): projected tiles plus their positions, after the CLS token."""
        x = self.patch_embed(x)
        pos = sincos_position_rows(self.coords_to_pos(coords, self.tile_size), self.embed_dim, self.slide_ngrids)
        x = x + pos.to(device=x.device, dtype=x.dtype)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # its position row is zeros
        return torch.cat((cls, x), dim=1)

    def forward(self, x: Tensor, coords: Tensor, all_layer_embed: bool = False,
                padding_mask: Optional[Tensor] = None) -> List[Tensor]:
        """List of (B, E) slide embeddings (one, or depth + 1 with ``all_layer_embed``).

        ``padding_mask`` (B, L), True = padding tile: every slide gets the
        embedding it gets alone (padded tiles are left out of attention and
        of the global pool).
        """
        if x.ndim != 3 or coords.shape != (*x.shape[:2], 2):
            raise ValueError(f"x must be (B, L, D) and coords (B, L, 2), got {tuple(x.shape)} and "
                             f"{tuple(coords.shape)}")
        tokens = self._tokens(x, coords)
        mask = None
        if padding_mask is not None:
            if padding_mask.shape != x.shape[:2]:
                raise ValueError(f"padding_mask must be (B, L) = {tuple(x.shape[:2])}, got {tuple(padding_mask.shape)}")
            mask = torch.cat([padding_mask.new_zeros((x.shape[0], 1)), padding_mask.to(torch.bool)], 1)
        out = self.encoder(src_tokens=None, token_embeddings=tokens, encoder_padding_mask=mask,
                           return_all_hiddens=all_layer_embed)
        states = out["encoder_states"] if all_layer_embed else [out["encoder_out"]]
        return [self._pool(h, mask) for h in states]

    def _pool(self, h: Tensor, mask: Optional[Tensor]) -> Tensor:
        if not self.global_pool:
            return self.norm(h)[:, 0]
        tiles = h[:, 1:]
        if mask is None:
            return self.norm(tiles.mean(dim=1))
        keep = (~mask[:, 1:]).unsqueeze(-1).to(tiles.dtype)
        return self.norm((tiles * keep).sum(1) / keep.sum(1).clamp(min=1))


def _layer_norm_eps6(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


# GigaPath's registered timm architectures: (embed_dim, depth).
MODEL_ARCHS: Dict[str, Tuple[int, int]] = {
    "gigapath_slide_enc12l768d": (768, 12),
    "gigapath_slide_enc24l1024d": (1024, 24),
    "gigapath_slide_enc12l1536d": (1536, 12),
}


def build_model(model_arch: str = "gigapath_slide_enc12l768d", in_chans: int = 1536, **kwargs) -> LongNetViT:
    """A randomly initialised slide encoder of one of GigaPath's architectures (:data:`MODEL_ARCHS`).

    ``kwargs`` go to :class:`LongNetViT` (``embed_dim``/``depth`` replace the architecture's).
    """
    if model_arch not in MODEL_ARCHS:
        raise ValueError(f"model_arch must be one of {sorted(MODEL_ARCHS)}, got {model_arch!r}")
    dim, depth = MODEL_ARCHS[model_arch]
    kwargs.setdefault("embed_dim", dim)
    kwargs.setdefault("depth", depth)
    return LongNetViT(in_chans=in_chans, mlp_ratio=4, norm_layer=_layer_norm_eps6, **kwargs)


def create_model(pretrained: str, model_arch: str = "gigapath_slide_enc12l768d", in_chans: int = 1536,
                 strict: bool = True, weights_only: bool = True, **kwargs) -> LongNetViT:
    """GigaPath's ``create_model``: the architecture, with ``slide_encoder.pth`` at ``pretrained`` loaded.

    ``pretrained`` is a local path (download ``slide_encoder.pth`` from the
    ``prov-gigapath/prov-gigapath`` Hugging Face repo first; ``hf_hub:`` names
    are refused: this never touches the network). A path that does not exist
    gives a randomly initialised model, as in GigaPath. ``strict`` raises on
    missing or unexpected keys (GigaPath prints them and goes on:
    ``strict=False``). A ``pos_embed`` entry, if a checkpoint has one, is the
    fixed table and is not needed. ``weights_only`` goes to ``torch.load``
    (set it False only for a checkpoint you trust that holds more than tensors).
    """
    if str(pretrained).startswith("hf_hub:"):
        raise ValueError("pretrained must be a local path to slide_encoder.pth (longnet.compat does not download; "
                         f"fetch it from the Hugging Face hub first), got {pretrained!r}")
    model = build_model(model_arch, in_chans, **kwargs)
    if os.path.exists(pretrained):
        state = torch.load(pretrained, map_location="cpu", weights_only=weights_only)
        state = dict(state["model"] if "model" in state else state)
        state.pop("pos_embed", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"{pretrained}: state dict does not match {model_arch}: missing {missing}, "
                             f"unexpected {unexpected}")
        for key in missing:
            print("Missing ", key)
        for key in unexpected:
            print("Unexpected ", key)
    return model


def pad_slides(slides: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """(x (B, L, D), coords (B, L, 2), padding_mask (B, L)) from per-slide (x (L_i, D), coords (L_i, 2)).

    Slides are right-padded with zeros to the longest; ``padding_mask`` is
    True on the padding, ready for ``LongNetViT.forward(..., padding_mask=)``.
    """
    if not slides:
        raise ValueError("slides must hold at least one (x, coords) pair")
    longest = max(x.shape[0] for x, _ in slides)
    x0, c0 = slides[0]
    xs = x0.new_zeros((len(slides), longest, x0.shape[-1]))
    cs = c0.new_zeros((len(slides), longest, 2))
    mask = torch.ones((len(slides), longest), dtype=torch.bool, device=x0.device)
    for i, (x, c) in enumerate(slides):
        xs[i, :x.shape[0]], cs[i, :x.shape[0]] = x, c
        mask[i, :x.shape[0]] = False
    return xs, cs, mask
