"""The benchmark harness: the registry of shapes, providers and plans (:mod:`.registry`), the
micro-benchmark cases (:mod:`.micro`), the end-to-end step (:mod:`.e2e`), timing
(:mod:`.timing`), the pipeline (:mod:`.run`), its tables and plots (:mod:`.report`) and the
command line (:mod:`.cli`)."""
