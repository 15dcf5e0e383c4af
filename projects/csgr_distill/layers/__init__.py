"""Reusable layers for the distillers (criss-cross attention, adapters, ...)."""
from .adapters import build_channel_adapter, channel_standardize
from .criss_cross import CrissCrossAttention

__all__ = ["CrissCrossAttention", "build_channel_adapter", "channel_standardize"]
