"""MLflow adapter (the edge): tracking, the pyfunc policy model, model registry, gated promotion.

Modules (none imported here, so ``import pxpo.mlflow.tracking`` stays cheap and
mlflow is only imported when it is used):

* :mod:`pxpo.mlflow.tracking`: tracking URIs, experiments, :class:`MlflowTracker`
  (a :class:`pxpo.tracking.Tracker`), the standard provenance tags;
* :mod:`pxpo.mlflow.datasets`: the prompt dataset as an MLflow dataset input (lineage);
* :mod:`pxpo.mlflow.pyfunc`: :class:`DiffusersPolicyModel`, the models-from-code pyfunc;
* :mod:`pxpo.mlflow.model_registry`: log the policy model, register versions,
  aliases ``challenger`` / ``champion``, load a registered pipeline back;
* :mod:`pxpo.mlflow.promotion`: the register stage's gate (:func:`gate_and_register`).

Inside this package ``import mlflow`` is absolute and means the MLflow library.
"""
