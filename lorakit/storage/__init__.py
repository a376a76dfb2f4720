"""Storage below the trainer: lorakit checkpoints (:mod:`lorakit.storage.checkpoint`) and PEFT
folders (:mod:`lorakit.storage.peft`)."""
