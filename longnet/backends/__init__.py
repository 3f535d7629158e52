"""Backends of :func:`longnet.dilated_attention`. Each computes docs/design.md §1-2 exactly."""
