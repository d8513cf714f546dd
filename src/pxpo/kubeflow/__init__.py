"""The Kubeflow edge of pxpo (no stage logic here).

* :mod:`pxpo.kubeflow.launcher`: what a KFP component runs inside its
  container: ``pxpo <stage>`` as a child process, fed only the params.yaml
  sections the stage reads (:data:`~pxpo.kubeflow.launcher.STAGE_SECTIONS`).
* :mod:`pxpo.kubeflow.container_images`: the container image references the
  components run in.
* :mod:`pxpo.kubeflow.trainjob`: the Kubeflow Trainer TrainJob of a multi-node
  train task.

The components live in the ``components`` package and the pipeline (with
``pxpo pipeline compile | run --local | submit``, :mod:`pipelines.commands`) in
the ``pipelines`` package, both installed with pxpo (see pyproject.toml). They
import this package, never the reverse, so importing
``pxpo.kubeflow.launcher`` in a component's container stays light.
"""
