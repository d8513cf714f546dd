"""The Kubeflow edge of pxpo (no stage logic here).

* :mod:`pxpo.kubeflow.launcher`: what a KFP component runs inside its
  container: ``pxpo <stage>`` as a child process, fed only the params.yaml
  sections the stage reads (:data:`~pxpo.kubeflow.launcher.STAGE_SECTIONS`).
* :mod:`pxpo.kubeflow.container_images`: the container image references the
  components run in.
* :mod:`pxpo.kubeflow.commands`: ``pxpo pipeline compile | run --local | submit``.

The components live in the ``components`` package and the pipeline in the
``pipelines`` package (both installed with pxpo, see pyproject.toml). This
package does not import them at import time, so importing
``pxpo.kubeflow.launcher`` in a component's container stays light.
"""
