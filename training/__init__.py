"""training: contrastive image-gene pretraining on streamed corpus shards.

``python -m stcorpus.training.pretrain --config tiny-cpu --set optim.lr=1e-4`` (or under
``torchrun --nproc_per_node N``) trains a CLIP/SigLIP two-tower model with STAMP's optional
multi-scale terms on batches of ``loaders/batch.py``. Modules, in the order a run uses them:

- :mod:`stcorpus.training.config`: the typed run config (YAML + ``--set`` overrides, strict keys)
- :mod:`stcorpus.training.data`: data sources (``synthetic`` in memory; ``corpus``: the torch corpus
  loader of ``loaders`` over a folder, URL or ``hf://`` repository, with its resume state)
- :mod:`stcorpus.training.encoders`, :mod:`stcorpus.training.model`: image/gene encoders and the two-tower model;
  what of the image tower trains (frozen, last blocks, LoRA); checkpoints back onto their base
- :mod:`stcorpus.training.pathology`: pathology foundation-model presets by Hub name (UNI, UNI2-h,
  Virchow, Virchow2, H-optimus-0/1, Prov-GigaPath, Phikon, Phikon-v2, CONCH's trunk), strict weights
- :mod:`stcorpus.training.stamp`: STAMP's stage 1, masked-expression pretraining of the gene encoder
- :mod:`stcorpus.training.losses`: CLIP / SigLIP losses gathered across ranks, the STAMP objective
- :mod:`stcorpus.training.schedule`: warm-up + cosine learning rate
- :mod:`stcorpus.training.pretrain`: the loop, logging, evaluation and checkpoint calls, the CLI
- :mod:`stcorpus.training.evaluate`: recall@k and the linear probe (pure functions of arrays)
- :mod:`stcorpus.training.checkpoint`: atomic, ``weights_only``-loadable checkpoints
- :mod:`stcorpus.training.hestbench`: HEST-Bench's protocol for any image encoder (``python -m``)

Importing this package imports nothing heavy; torch loads with the modules that need it.
"""
