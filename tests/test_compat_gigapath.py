"""longnet.compat.gigapath against the ORIGINAL Prov-GigaPath slide encoder (fixtures), and batching.

``gigapath_tiny.npz`` holds a 2-layer, 48-wide, 3-head slide encoder of GigaPath's
structure with random weights, run by GigaPath's own code (make_fixtures.py);
``gigapath_12l768d_keys.json`` the full-size encoder's state-dict keys and shapes.
"""

import json
import os

import numpy as np
import pytest
import torch

from longnet.compat.gigapath import (LongNetViT, build_model, create_model, optimal_segment_length, pad_slides,
                                     sincos_position_rows)
from tests.test_compat_torchscale import FIXTURES, load_fixture

TOL = {torch.float64: (1e-6, 1e-6), torch.float32: (2e-5, 2e-5)}


def _tiny_kwargs(meta):
    return dict(in_chans=meta["in_chans"], embed_dim=meta["embed_dim"], depth=meta["depth"],
                max_wsi_size=meta["max_wsi_size"], encoder_overrides=meta["encoder_overrides"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    meta, params, inputs, outputs = load_fixture("gigapath_tiny")
    path = tmp_path_factory.mktemp("gigapath") / "slide_encoder.pth"
    torch.save({"model": params}, path)  # GigaPath's layout: {"model": state_dict}
    return meta, path, inputs, outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_matches_original(tiny, dtype):
    meta, path, inputs, outputs = tiny
    model = create_model(str(path), "gigapath_slide_enc12l768d", **_tiny_kwargs(meta)).to(dtype).eval()
    assert model.encoder.args.segment_length == meta["segment_length"]
    x, coords = inputs["x"].to(dtype), inputs["coords"].to(dtype)
    for pool in (False, True):
        model.global_pool = pool
        tag = "pool" if pool else "cls"
        with torch.no_grad():
            out = model(x, coords)
            layers = model(x, coords, all_layer_embed=True)
        assert len(out) == 1 and len(layers) == meta["depth"] + 1
        for got, want in [(out[0], outputs[f"{tag}/out"])] + [(e, outputs[f"{tag}/layer{i}"])
                                                              for i, e in enumerate(layers)]:
            torch.testing.assert_close(got.double(), want.double(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def _full_size_keys():
    with open(os.path.join(FIXTURES, "gigapath_12l768d_keys.json")) as f:
        return json.load(f)


def test_full_size_state_dict_layout_is_gigapaths():
    with torch.device("meta"):
        ours = build_model("gigapath_slide_enc12l768d")
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == _full_size_keys()


@pytest.mark.slow
def test_full_size_checkpoint_loads(tmp_path):
    """A 12-layer, 768-wide slide_encoder.pth with random weights in GigaPath's layout (344 MB)."""
    original = _full_size_keys()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in original.items()}
    path = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, path)
    del state
    model = create_model(str(path))  # strict: raises on any missing or unexpected key
    assert model.encoder.args.segment_length == [1024, 5792, 32768, 185363, 1048576]
    assert model.encoder.args.dilated_ratio == [1, 2, 4, 8, 16]
    assert not any("pos_embed" in k for k in model.state_dict())


def test_strict_load_reports_mismatch(tiny, tmp_path):
    meta, path, _, _ = tiny
    state = torch.load(path)["model"]
    state["extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    bad = tmp_path / "slide_encoder.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(ValueError, match="norm.bias"):
        create_model(str(bad), **_tiny_kwargs(meta))
    with pytest.raises(ValueError, match="local path"):
        create_model("hf_hub:prov-gigapath/prov-gigapath")


@pytest.mark.parametrize("pool", [False, True])
def test_batch_with_padding_equals_each_slide_alone(tiny, pool):
    meta, path, inputs, _ = tiny
    model = create_model(str(path), **_tiny_kwargs(meta)).double().eval()
    model.global_pool = pool
    x, coords = inputs["x"][0].double(), inputs["coords"][0].double()
    # 150 tiles, 61, 1 and 0 (CLS alone): the short slides' padding covers whole segments (64, 128).
    slides = [(x, coords), (x[:61], coords[:61]), (x[100:101], coords[100:101]), (x[:0], coords[:0])]
    bx, bc, mask = pad_slides(slides)
    with torch.no_grad():
        batched = model(bx, bc, all_layer_embed=True, padding_mask=mask)
        for i, (xi, ci) in enumerate(slides):
            alone = model(xi[None], ci[None], all_layer_embed=True)
            for got, want in zip(batched, alone):
                assert torch.isfinite(got).all()
                if pool and xi.shape[0] == 0:
                    continue  # alone, a slide without tiles has no mean (NaN, as in GigaPath)
                torch.testing.assert_close(got[i], want[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_float32(tiny, dtype):
    meta, path, inputs, _ = tiny
    model = create_model(str(path), **_tiny_kwargs(meta)).eval()
    with torch.no_grad():
        ref = model(inputs["x"], inputs["coords"])[0]
        out = model.to(dtype)(inputs["x"].to(dtype), inputs["coords"])[0]
    assert out.dtype == dtype and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    assert cos.min() > 0.99


def _table(embed_dim, grid):
    """GigaPath's (1 + grid^2, E) table, restated: w varies fastest; [sincos(w) | sincos(h)]; row 0 zeros."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, w), one_d(embed_dim // 2, h)], 1)
    return torch.from_numpy(np.concatenate([np.zeros([1, embed_dim]), emb], 0)).float()


def test_positions_equal_the_table_without_building_it():
    table = _table(16, 7)
    index = torch.tensor([[0, 1, 8, 49], [13, 7, 30, 2]])
    torch.testing.assert_close(sincos_position_rows(index, 16, 7), table[index], atol=0, rtol=0)
    with pytest.raises(ValueError, match="grid"):
        sincos_position_rows(torch.tensor([50]), 16, 7)
    model = LongNetViT(in_chans=4, embed_dim=16, depth=1, slide_ngrids=7, encoder_overrides={
        "encoder_attention_heads": 2, "encoder_ffn_embed_dim": 8})
    coords = torch.tensor([[[0.0, 0.0], [256.0 * 3 + 5, 256.0 * 2 + 255], [256.0 * 6, 256.0 * 6]]])
    assert model.coords_to_pos(coords).tolist() == [[1, 3 * 7 + 2 + 1, 6 * 7 + 6 + 1]]


def test_optimal_segment_length_is_gigapaths():
    assert optimal_segment_length() == "[1024, 5792, 32768, 185363, 1048576]"
