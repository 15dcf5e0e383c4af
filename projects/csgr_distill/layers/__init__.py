"""Reusable layers for the distillers (criss-cross attention, adapters, ...)."""
from .adapters import build_channel_adapter, channel_standardize
from .criss_cross import CrissCrossAttention
from .gc_block import GlobalContextBlock

__all__ = ["CrissCrossAttention", "GlobalContextBlock", "build_channel_adapter", "channel_standardize"]
