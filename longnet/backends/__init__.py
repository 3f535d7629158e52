"""Backends of :func:`longnet.dilated_attention`. Each computes SPEC.md §1-2 exactly."""
