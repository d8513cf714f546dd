"""The pxpo Kubeflow pipeline (:mod:`pipelines.pxpo_pipeline`), installed with pxpo.

:mod:`pipelines.commands` holds ``pxpo pipeline compile | run --local | submit``
(the CLI imports it lazily); the library (``pxpo.kubeflow``) never imports this package.
"""
