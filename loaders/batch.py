"""What the torch loader yields and ``training`` consumes: names and shapes of a batch.

A collated batch is a plain ``dict`` (it crosses DataLoader worker boundaries and pin_memory).
Which entries are present depends on the loader's settings (views, gene transform):

=================  ==================  =============================================================
key                type                meaning
=================  ==================  =============================================================
``key``            list[str]           sample keys ``<slide_id>__<barcode>``
``slide_id``       list[str]           slide of each sample
``patch``          uint8 (B,3,H,W)     the 0.5 um/px view (when ``"patch"`` in views)
``region``         uint8 (B,3,H,W)     the 1.5 um/px view (when ``"region"`` in views)
``pos``            int64 (B,)          cell 0..8 of the patch inside the region
``expr``           float32 (B,G)       transformed expression on the selected genes (dense transforms)
``expr_mask``      bool (B,G)          True where the sample's slide measured the gene
``niche``          float32 (B,G)       transformed summed neighbour expression (when asked for)
``tokens``         int64 (B,L)         rank tokens: gene ids by descending scaled expression (rank transform)
``tokens_mask``    bool (B,L)          True on real tokens, False on padding
``niche_tokens``   int64 (B,L)         rank tokens of the summed neighbours (rank transform, niche on)
``niche_tokens_mask`` bool (B,L)       True on real niche tokens
=================  ==================  =============================================================

Images stay uint8 until they reach the device: the training step converts and normalises them
there, which moves 4x fewer bytes through pinned memory. They are laid out channels-last in
memory (a ``(B,3,H,W)`` view of ``(B,H,W,3)`` data, as decoded): call ``.contiguous()`` only if an
operation needs NCHW memory.

Token ids are ``column + 1`` of the selected genes (0 is padding): the vocabulary of a token
embedding is ``n_genes + 1``.

With ``on_bad_sample`` ``warn``/``skip``, a batch may hold fewer samples than the batch size, even
zero: batch boundaries stay fixed so that ranks stay in lockstep and resume stays exact, and a
training step must skip an empty batch.
"""

from __future__ import annotations

from typing import Final

KEY: Final = "key"
SLIDE_ID: Final = "slide_id"
PATCH: Final = "patch"
REGION: Final = "region"
POS: Final = "pos"
EXPR: Final = "expr"
EXPR_MASK: Final = "expr_mask"
NICHE: Final = "niche"
TOKENS: Final = "tokens"
TOKENS_MASK: Final = "tokens_mask"
NICHE_TOKENS: Final = "niche_tokens"
NICHE_TOKENS_MASK: Final = "niche_tokens_mask"

#: Entries that are tensors (the rest are lists of strings).
TENSOR_KEYS: Final = (PATCH, REGION, POS, EXPR, EXPR_MASK, NICHE, TOKENS, TOKENS_MASK, NICHE_TOKENS, NICHE_TOKENS_MASK)
