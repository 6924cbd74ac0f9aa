"""training: contrastive image-gene pretraining on streamed corpus shards."""
