"""The pxpo Kubeflow components: one lightweight component per stage.

Each runs ``pxpo <stage>`` as a child process through
:func:`pxpo.kubeflow.launcher.run_stage`, given only the params.yaml sections
the stage reads (``params_<section>`` inputs, see
:data:`pxpo.kubeflow.launcher.STAGE_SECTIONS`).
"""
