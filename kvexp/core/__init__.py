"""kvexp's core: what an inference engine is made of, free of the experiment layer.

The model (model.py, fused.py), the KV-cache formats and caches (kv.py), the Triton kernels with their PyTorch
references (kernels/), the int4 linear (int4.py), the decode loop (decode.py), the Engine interface (engine.py)
and the frozen build spec every engine is built from (spec.py). Nothing here imports Hydra, MLflow or lm-eval
(tests/test_layers.py checks it): the experiment layer above (config, preflight, jobs, tracking, evaluation,
compare) turns a Hydra config into a BuildSpec and drives engines through this interface.
"""
