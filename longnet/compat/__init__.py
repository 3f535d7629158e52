"""Run models built on other LongNet implementations with longnet's kernels.

* :mod:`longnet.compat.torchscale`: torchscale's LongNet encoder/decoder and configs.
* :mod:`longnet.compat.gigapath`: Prov-GigaPath's slide encoder, loading ``slide_encoder.pth`` unchanged.
* :mod:`longnet.compat.attention`: torchscale's dilated-attention numerics as a function.

These reproduce the originals' function, which differs from longnet's own
``dilated_attention`` (docs/gigapath.md has the table). Nothing is imported
here: each module loads when used.
"""
