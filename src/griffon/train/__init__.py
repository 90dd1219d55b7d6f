"""Training: configuration (:mod:`.config`), the trainer (:mod:`.trainer`) and its checkpoints
(:mod:`.state`; the run directory's layout is :class:`griffon.run.Run`), optimizer and schedules (:mod:`.optim`), losses, logging,
signals, DDP/FSDP2 under torchrun (:mod:`.parallelize`, :mod:`.distributed`), self-guided training
of structured FFNs (:mod:`.self_guided`), the papers' recipes (:mod:`.recipes`) and ``model=auto``,
which plans the model for a corpus, a budget and a machine (:mod:`.auto`)."""
