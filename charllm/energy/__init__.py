"""Energy of pipeline instructions (the Perseus study, SOSP'24).

- :mod:`.attribution`: energy of each pipeline instruction from a cumulative NVML energy
  series; the per-rank instruction timeline; ``stage_profile.csv`` in the schema of Zeus's
  pipeline frequency optimizer (``stage,instruction,frequency,time,energy``).
- :mod:`.recorder`: times every forward and backward of every micro batch of a pipeline
  stage (CUDA events on a GPU, the host clock on CPU) for ``profile: instructions``.
- :mod:`.control`: the GPU-control gate (``gpu_control`` of a cluster profile, deny by
  default) and the controller that locks clocks / power limits and restores them on every
  exit path.
- :mod:`.planner`: the 1F1B instruction DAG, the all-maximum-frequency baseline and the
  time-energy frontier (``lowtime``'s Phillips-Dessouky min-cut solver, an optional extra).
- :mod:`.figures`, :mod:`.cli`: ``charllm energy-plan`` and its figures.

Imports neither torch nor pydantic at module level.
"""
