"""What the torch loader yields and ``training`` consumes: names and shapes of a batch.

The names and dtypes are the contract's (``stcorpus.schema.Batch``, ``schema.BATCH_DTYPES``);
this module gives them short names and says what each holds. A batch is a plain ``dict`` (it
crosses DataLoader worker boundaries and pin_memory). Which entries are present depends on the
loader's settings (views, decode, gene transform and output):

What the workers hand over (``CorpusLoader`` without ``device``, or ``CorpusDataset`` itself):

=======================  ==================  ======================================================
key                      type                meaning
=======================  ==================  ======================================================
``key``                  list[str]           sample keys ``<slide_id>__<barcode>``
``slide_id``             list[str]           slide of each sample
``patch``                uint8 (B,3,H,W)     the patch view (decode: cpu; H, W from corpus.json views)
``region``               uint8 (B,3,H,W)     the region view (decode: cpu)
``patch_jpeg``           uint8 (N,)          decode: nvjpeg: the batch's patch JPEGs, concatenated
``patch_jpeg_offsets``   int64 (B+1,)        sample ``b``'s JPEG is ``patch_jpeg[o[b]:o[b+1]]``
``region_jpeg`` (+ off.) uint8 (N,)          likewise for the region
``augment_rot90``        int64 (B,)          decode: nvjpeg + augment: quarter turns to apply
``augment_hflip``        bool (B,)           ... horizontal flips after the turns
``augment_jitter``       float32 (B,3)       ... brightness, contrast, saturation factors
``pos``                  int64 (B,)          cell 0..8 of the patch inside the region (after augment)
``genes``                int32 (nnz,)        sparse: vocabulary indices of the non-zero raw counts
``counts``               int32/float32       sparse: the raw counts (float32 for a corpus of floats)
``offsets``              int64 (B+1,)        sparse: sample ``b`` owns ``[offsets[b], offsets[b+1])``
``niche_genes`` ...      as above            sparse summed neighbour counts (``genes.niche``)
``n_neighbors``          float32 (B,)        neighbours summed into the niche
``slide_index``          int64 (B,)          row of the sample's slide in the transform's tables
=======================  ==================  ======================================================

What the consumer gets after ``CorpusLoader(..., device=...)`` / ``CorpusDataset.finish`` (or
straight from the workers with ``genes.output: dense``), the sparse entries replaced by:

=======================  ==================  ======================================================
``expr``                 float32 (B,G)       transformed expression on the selected genes (dense transforms)
``expr_mask``            bool (B,G)          True where the sample's slide measured the gene
``niche``                float32 (B,G)       transformed summed neighbour expression (when asked for)
``tokens``               int64 (B,L)         rank tokens: gene ids by descending scaled expression (rank)
``tokens_mask``          bool (B,L)          True on real tokens, False on padding
``niche_tokens``         int64 (B,L)         rank tokens of the summed neighbours (rank, niche on)
``niche_tokens_mask``    bool (B,L)          True on real niche tokens
=======================  ==================  ======================================================

and, with decode: nvjpeg, ``patch``/``region`` decoded on the device (augmentation applied).

Images stay uint8 until they reach the device: the training step converts and normalises them
there, which moves 4x fewer bytes through pinned memory. Decoded on the CPU they are laid out
channels-last in memory (a ``(B,3,H,W)`` view of ``(B,H,W,3)`` data, as decoded): call
``.contiguous()`` only if an operation needs NCHW memory.

Token ids are ``column + 1`` of the selected genes (0 is padding): the vocabulary of a token
embedding is ``n_genes + 1``.

With ``on_bad_sample`` ``warn``/``skip``, a batch may hold fewer samples than the batch size, even
zero: batch boundaries stay fixed so that ranks stay in lockstep and resume stays exact, and a
training step must skip an empty batch.
"""

from __future__ import annotations

from typing import Final

from stcorpus.schema import BATCH_DTYPES, SPARSE_EXPRESSION, Batch

KEY: Final = Batch.KEY.value
SLIDE_ID: Final = Batch.SLIDE_ID.value
PATCH: Final = Batch.PATCH.value
REGION: Final = Batch.REGION.value
PATCH_JPEG: Final = Batch.PATCH_JPEG.value
PATCH_JPEG_OFFSETS: Final = Batch.PATCH_JPEG_OFFSETS.value
REGION_JPEG: Final = Batch.REGION_JPEG.value
REGION_JPEG_OFFSETS: Final = Batch.REGION_JPEG_OFFSETS.value
AUGMENT_ROT90: Final = Batch.AUGMENT_ROT90.value
AUGMENT_HFLIP: Final = Batch.AUGMENT_HFLIP.value
AUGMENT_JITTER: Final = Batch.AUGMENT_JITTER.value
POS: Final = Batch.POS.value
GENES: Final = Batch.GENES.value
COUNTS: Final = Batch.COUNTS.value
OFFSETS: Final = Batch.OFFSETS.value
NICHE_GENES: Final = Batch.NICHE_GENES.value
NICHE_COUNTS: Final = Batch.NICHE_COUNTS.value
NICHE_OFFSETS: Final = Batch.NICHE_OFFSETS.value
N_NEIGHBORS: Final = Batch.N_NEIGHBORS.value
SLIDE_INDEX: Final = Batch.SLIDE_INDEX.value
EXPR: Final = Batch.EXPR.value
EXPR_MASK: Final = Batch.EXPR_MASK.value
NICHE: Final = Batch.NICHE.value
TOKENS: Final = Batch.TOKENS.value
TOKENS_MASK: Final = Batch.TOKENS_MASK.value
NICHE_TOKENS: Final = Batch.NICHE_TOKENS.value
NICHE_TOKENS_MASK: Final = Batch.NICHE_TOKENS_MASK.value

#: Entries that are tensors (the rest are lists of strings).
TENSOR_KEYS: Final = tuple(BATCH_DTYPES)
#: The sparse expression entries the gene transform consumes.
SPARSE_KEYS: Final = SPARSE_EXPRESSION

__all__ = [name for name in dir() if name.isupper()]
