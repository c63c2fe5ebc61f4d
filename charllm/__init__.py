"""charllm: campaigns that characterise distributed LLM training (power, performance, thermals)."""

from __future__ import annotations

__version__ = "0.1.0"
