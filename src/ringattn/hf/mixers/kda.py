"""Kimi delta attention (KDA): Kimi Linear, Bailing-hybrid, GLM-5-next.

Gated DeltaNet's rule with a gate per key channel: a token multiplies the state ``(heads, K, V)`` on the left by
``(I - beta k k^T) Diag(exp(g))``, still a dense ``K x K`` transition that the rule computes itself (see
``gated_delta.py``, whose ``delta_rule`` runs both).
"""

from __future__ import annotations

from .gated_delta import register_rules

register_rules("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention", "Kimi delta attention (KDA)")
