"""The pxpo Kubeflow pipeline (:mod:`pipelines.pxpo_pipeline`), installed with pxpo."""
