"""What every layer shares, importing nothing of the package but :mod:`rnope_megatron.compat`: user errors
(:mod:`.errors`), typed dataclass construction (:mod:`.typed`), console-script plumbing
(:mod:`.cli`), staged outputs that never lose data (:mod:`.output`), fault points for tests
(:mod:`.faults`), the GPU table and probes (:mod:`.gpus`), process groups for one rank
(:mod:`.distributed`, over the CPU compatibility layer of :mod:`rnope_megatron.compat`), the
garbage collector kept out of heavy imports (:mod:`.collector`)."""
