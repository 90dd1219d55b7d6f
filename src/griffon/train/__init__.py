"""Training: configuration (:mod:`.config`), the trainer (:mod:`.trainer`) and its checkpoints
(:mod:`.state`; the run directory's layout is :class:`griffon.run.Run`), the objectives it trains
with and the interface it reaches them through (:mod:`.objective`), optimizer and schedules
(:mod:`.optim`), losses, logging, signals, DDP/FSDP2 under torchrun (:mod:`.parallelize`,
:mod:`.distributed`), self-guided training of structured FFNs (:mod:`.self_guided`), starting
weights (:mod:`.init`) and the papers' recipes (:mod:`.recipes`)."""
