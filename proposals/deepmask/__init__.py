"""DeepMask object proposals (Pinheiro, Collobert, Dollar: "Learning to Segment Object Candidates", NIPS 2015, §3).

* ``model``   -- the network (§3.1, §3.4): shared trunk, segmentation branch (low-rank or full), scoring branch, and
                 the same weights as convolutions for full-scene inference (§3.3).
* ``sampler`` -- training patches from COCO-format instance masks (§3.2, §3.4): jittered canonical positives,
                 negatives away from every object, 1:1 score batches, counter-based (exactly resumable).
* ``train``   -- the loss of eq. (1) and the SGD training loop with validation and resumable checkpoints.
* ``infer``   -- full-scene multi-scale inference: ranked masks (RLE), scores and mask-extent boxes;
                 ``build_deepmask_proposer(cfg, checkpoint)`` is what ``proposals.build_proposer`` calls.

Kept import-light (no torch at import): import the submodules.
"""
